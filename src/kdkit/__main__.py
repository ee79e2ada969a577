from kdkit.cli import main

main()
