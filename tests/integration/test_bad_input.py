"""Bad input gives one clear line and exit code 2, never a traceback.

Each case checks: exit code 2; stderr's first line starts with "error:" and names the field or file, the bad
value and what was expected; no "Traceback" anywhere. Most cases call `kdkit.cli.main` in this process (the same
error mapping as the binary, milliseconds per case); the last few run `python -m kdkit` as a real process.
"""

from __future__ import annotations

import re

import pytest


def assert_user_error(result, *needles: str) -> str:
    """The contract for bad input; `needles` must all appear in the first line. Returns that line."""
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr + result.stdout, result.describe()
    first = result.first_error_line
    assert first.startswith("error:"), result.describe()
    for needle in needles:
        assert needle in first, f"{needle!r} not in the first line: {first!r}\n{result.describe()}"
    return first


# ---------------------------------------------------------------------------------------------------------------
# The config: keys, types, overrides, the file itself


def test_unknown_top_level_key_suggests_the_close_one(cli, make_config):
    def mistype(cfg):
        cfg["trian"] = cfg.pop("train")

    first = assert_user_error(cli("train", make_config(mistype), "--out", "out"), "trian", "did you mean: train")
    assert "unknown key" in first


def test_unknown_nested_key_is_named_with_its_section(cli, make_config):
    def mistype(cfg):
        cfg["train"] = {"epoch": 3}

    assert_user_error(cli("train", make_config(mistype), "--out", "out"), "train.epoch", "did you mean: epochs")


def test_wrong_type_names_field_and_value(cli, make_config):
    def mistype(cfg):
        cfg["train"]["lr"] = "fast"

    first = assert_user_error(cli("train", make_config(mistype), "--out", "out"), "train.lr", "'fast'")
    assert "number" in first  # what was expected


def test_several_errors_are_all_listed(cli, make_config):
    def break_three(cfg):
        cfg["train"] = {"lr": "fast", "epoch": 3}
        cfg["trian"] = {}

    result = cli("train", make_config(break_three), "--out", "out")
    assert_user_error(result, "3 problems")
    details = result.stderr.strip().splitlines()[1:]
    assert len(details) == 3, result.describe()
    for field in ("train.lr", "train.epoch", "trian"):
        assert sum(line.lstrip(" -").startswith(f"{field}:") for line in details) == 1, result.describe()


def test_set_without_equals(cli, make_config):
    assert_user_error(
        cli("train", make_config(), "--out", "out", "--set", "train.epochs"), "--set", "train.epochs", "KEY=VALUE"
    )


def test_set_of_an_unknown_key(cli, make_config):
    assert_user_error(
        cli("train", make_config(), "--out", "out", "--set", "train.epochz=3"), "train.epochz", "did you mean: epochs"
    )


def test_set_of_an_unknown_section(cli, make_config):
    assert_user_error(cli("validate", make_config(), "--set", "trainer.epochs=3"), "trainer", "unknown key")


def test_missing_config_file(cli):
    assert_user_error(cli("train", "nope.yaml", "--out", "out"), "nope.yaml", "not found")


def test_config_that_is_not_yaml_reports_the_line(cli, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("run:\n  name: x\n  seeds: [0, 1\ntrain:\n  epochs: 2\n")
    first = assert_user_error(cli("train", config, "--out", "out"), "broken.yaml")
    assert re.search(r"line \d+", first), first


def test_config_that_is_a_list(cli, tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- run\n- train\n")
    assert_user_error(cli("validate", config), "list.yaml", "expected a mapping", "list")


def test_binary_config_file_names_the_file(cli, tmp_path):
    config = tmp_path / "weights.yaml"
    config.write_bytes(bytes(range(128, 256)) * 4)  # not UTF-8: a model file given by mistake
    assert_user_error(cli("validate", config), "weights.yaml", "not UTF-8", "expected a YAML file")
    config.write_bytes(b"run:\n  name: \x00\x01\x02\n")  # UTF-8, but control characters
    assert_user_error(cli("validate", config), "weights.yaml", "#x0000", "expected a text file")


# ---------------------------------------------------------------------------------------------------------------
# Loss values and built-in names that only the registries know (kdkit validate runs the losses' own checks)


def test_validate_runs_the_loss_value_checks(cli, make_config):
    def negative(cfg):
        cfg["distill"]["losses"] = [{"name": "ce", "weight": 0.1}, {"name": "soft_kl", "params": {"temperature": -1}}]

    first = assert_user_error(cli("validate", make_config(negative)), "distill.losses.1.params.temperature", "-1")
    assert first.endswith("expected a number > 0")


def test_validate_checks_every_value_a_schedule_reaches(cli, make_config):
    def anneal_to_zero(cfg):
        anneal = {"schedule": "linear", "start": 4, "end": 0}
        cfg["distill"]["losses"] = [
            {"name": "ce", "weight": 0.1},
            {"name": "soft_kl", "params": {"temperature": anneal}},
        ]

    assert_user_error(
        cli("validate", make_config(anneal_to_zero)),
        "distill.losses.1.params.temperature",
        "end of its linear schedule",
        "temperature=0",
        "expected a number > 0",
    )


def test_several_loss_problems_are_one_line_each(cli, make_config):
    def two_bad(cfg):
        cfg["distill"]["losses"] = [
            {"name": "ce", "params": {"label_smoothing": 1.5}},
            {"name": "dkd", "params": {"beta": -8}},
        ]

    result = cli("validate", make_config(two_bad))
    assert_user_error(result, "2 problems")
    details = [line.lstrip(" -") for line in result.stderr.strip().splitlines()[1:]]
    assert details == [
        "distill.losses.0.params.label_smoothing: label_smoothing=1.5; expected 0 <= value < 1",
        "distill.losses.1.params.beta: beta=-8; expected a number >= 0",
    ], result.describe()


def test_validate_checks_the_builtin_data_set_name(cli, make_config):
    def unknown(cfg):
        cfg["data"] = {"source": "builtin", "name": "cifar1000"}

    first = assert_user_error(cli("validate", make_config(unknown)), "data.name", "'cifar1000'", "expected one of")
    assert "digits" in first and "mnist5k" in first

    def typo(cfg):
        cfg["data"] = {"source": "builtin", "name": "mnist5"}

    assert_user_error(cli("validate", make_config(typo)), "data.name", "'mnist5'", "did you mean: mnist5k")


# ---------------------------------------------------------------------------------------------------------------
# Data files


def test_missing_data_file(cli, make_config):
    def point_at_nothing(cfg):
        cfg["data"] = {"source": "csv", "path": "nope.csv"}

    assert_user_error(cli("train", make_config(point_at_nothing), "--out", "out"), "data.path", "nope.csv", "not found")


def test_csv_with_unknown_label_column_lists_the_columns(cli, make_config, digits_csv):
    path = digits_csv()

    def wrong_label(cfg):
        cfg["data"] = {"source": "csv", "path": str(path), "label_column": "lable"}

    first = assert_user_error(
        cli("train", make_config(wrong_label), "--out", "out"), "data.label_column", "'lable'", path.name
    )
    assert "columns: p0, p1" in first and first.rstrip().endswith("label"), first
    assert "did you mean: label" in first


def test_csv_with_a_header_but_no_rows(cli, make_config, tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("a,b,label\n")

    def empty(cfg):
        cfg["data"] = {"source": "csv", "path": str(path)}

    assert_user_error(cli("train", make_config(empty), "--out", "out"), "data.path", "empty.csv", "empty")


def test_csv_with_one_class(cli, make_config, digits_csv):
    path = digits_csv([7], "sevens.csv")

    def one_class(cfg):
        cfg["data"] = {"source": "csv", "path": str(path)}

    assert_user_error(cli("train", make_config(one_class), "--out", "out"), "only one class", "'7'", "two classes")


# ---------------------------------------------------------------------------------------------------------------
# Models, teachers and losses that do not fit


def test_teacher_with_another_class_count(cli, make_config, three_class_run):
    def kdkit_teacher(cfg):
        cfg["teacher"]["members"] = [{"model": {"source": "kdkit", "path": str(three_class_run / "student")}}]

    assert_user_error(cli("train", make_config(kdkit_teacher), "--out", "out"), "teacher", "3 classes", "10")


def test_student_with_another_class_count(cli, make_config, three_class_run):
    def kdkit_student(cfg):
        cfg["student"]["model"] = {"source": "kdkit", "path": str(three_class_run / "student")}

    first = assert_user_error(
        cli("train", make_config(kdkit_student), "--out", "out"), "student.model", "3 classes", "10"
    )
    assert first.startswith("error: student.model:"), first


def test_kdkit_model_folder_that_does_not_exist(cli, make_config):
    def nowhere(cfg):
        cfg["teacher"]["members"] = [{"model": {"source": "kdkit", "path": "nowhere"}}]

    assert_user_error(
        cli("train", make_config(nowhere), "--out", "out"), "teacher.members.0.model.path", "'nowhere'", "model.json"
    )


def test_student_kwargs_typo(cli, make_config):
    def typo(cfg):
        cfg["student"]["model"]["kwargs"] = {"hiden": [8]}

    for verb in (["validate"], ["train"]):
        args = [*verb, make_config(typo)] + (["--out", "out"] if verb == ["train"] else [])
        assert_user_error(cli(*args), "student.model.kwargs.hiden", "did you mean: hidden")


def test_unknown_loss_name(cli, make_config):
    def typo(cfg):
        cfg["distill"]["losses"] = [{"name": "soft_kll", "weight": 1.0}]

    for args in (["validate"], ["train", "--out", "out"]):
        assert_user_error(
            cli(args[0], make_config(typo), *args[1:]), "distill.losses.0.name", "'soft_kll'", "did you mean: soft_kl"
        )


def test_teacher_checkpoint_that_does_not_fit(cli, make_config, three_class_run):
    weights = three_class_run / "student" / "model.safetensors"  # an 8-unit, 3-class MLP; the teacher is 32 × 10

    def checkpoint(cfg):
        cfg["teacher"]["members"][0]["model"]["checkpoint"] = str(weights)

    first = assert_user_error(
        cli("train", make_config(checkpoint), "--out", "out"),
        "teacher.members.0.model.checkpoint",
        "model.safetensors",
        "does not fit",
    )
    assert "(8, 64) vs (32, 64)" in first, first


@pytest.mark.parametrize("content", [b"", b"not a safetensors file"], ids=["empty", "garbage"])
def test_teacher_checkpoint_that_is_not_safetensors(cli, make_config, tmp_path, content):
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(content)

    def checkpoint(cfg):
        cfg["teacher"]["members"][0]["model"]["checkpoint"] = str(weights)

    result = cli("train", make_config(checkpoint), "--out", "out")
    assert_user_error(result, "teacher.members.0.model.checkpoint", "teacher.safetensors", "could not read")


# ---------------------------------------------------------------------------------------------------------------
# Training, resuming, evaluating


def test_nan_loss_stops_training(cli, make_config):
    # lr=1e30: AdamW's first step moves every weight by ~1e30, so the next forward overflows and the loss is NaN
    # at step 2 of the first phase that uses train.lr (the baseline; the teacher has its own teacher.train.lr).
    result = cli("train", make_config(), "--out", "out", "--set", "train.lr=1e30")
    first = assert_user_error(result, "baseline-s0", "step 2", "training stopped")
    assert "nan" in first.lower() or "inf" in first.lower(), first
    assert "train.lr" in first  # what to do about it


def test_fp16_on_cpu(cli, make_config):
    first = assert_user_error(
        cli("train", make_config(), "--out", "out", "--set", "train.precision=fp16", "--set", "run.device=cpu"),
        "train.precision",
        "fp16",
    )
    assert "CUDA" in first


def test_resume_with_another_config_names_the_key(cli, finished_run):
    # The run was made with --set train.epochs=1; resuming it with 5 epochs is another run.
    args = ["train", finished_run.config, "--out", finished_run.run_dir, "--resume", "--set", "train.epochs=5"]
    assert_user_error(cli(*args), "--resume", "train.epochs", str(finished_run.run_dir / "config.yaml"))


def test_resume_of_an_empty_directory(cli, make_config, tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert_user_error(cli("train", make_config(), "--out", empty, "--resume"), "--resume", str(empty), "no run")


def test_eval_of_a_folder_that_is_not_a_run(cli, tmp_path):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    assert_user_error(cli("eval", folder), "RUN_DIR", str(folder), "not a kdkit run directory")


# ---------------------------------------------------------------------------------------------------------------
# The same contract from a real process: what a user's terminal shows (no warnings before the error line)


def test_process_unknown_key(cli_process, make_config):
    def mistype(cfg):
        cfg["trian"] = cfg.pop("train")

    assert_user_error(cli_process("validate", make_config(mistype)), "trian", "did you mean: train")


def test_process_missing_config(cli_process, tmp_path):
    assert_user_error(cli_process("validate", tmp_path / "nope.yaml"), "nope.yaml", "not found")


def test_process_missing_data_file(cli_process, make_config):
    # `train` imports the whole pipeline (torch, scikit-learn, accelerate) before it fails: nothing they print
    # may come before the error line.
    def point_at_nothing(cfg):
        cfg["data"] = {"source": "csv", "path": "nope.csv"}

    result = cli_process("train", make_config(point_at_nothing), "--out", "out")
    assert_user_error(result, "data.path", "nope.csv", "not found")
