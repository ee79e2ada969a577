"""kdkit."""
