"""Fuzzing the config front door: hypothesis-generated YAML and --set overrides never produce a traceback from the
CLI; each ends in success (exit 0) or one clear error (exit 2)."""

from __future__ import annotations

import copy

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kdkit.cli import main  # noqa: E402

VALID = {
    "run": {"name": "fuzz", "seeds": [0]},
    "data": {"source": "builtin", "name": "digits"},
    "teacher": {"members": [{"model": {"name": "mlp", "kwargs": {"hidden": [8]}}}]},
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [4]}}},
    "distill": {"losses": [{"name": "ce", "weight": 0.1}, {"name": "soft_kl", "weight": 0.9}]},
    "train": {"epochs": 1},
}
KEYS = [
    "run",
    "data",
    "teacher",
    "student",
    "distill",
    "train",
    "eval",
    "search",
    "members",
    "model",
    "name",
    "kwargs",
    "losses",
    "weight",
    "params",
    "temperature",
    "epochs",
    "lr",
    "seeds",
    "source",
    "path",
    "augment",
    "schedule",
    "start",
    "end",
    "cache_teacher",
    "cache_views",
    "mutual",
    "enabled",
    "space",
    "low",
    "high",
    "choices",
    "hidden",
    "precision",
    "batch_size",
    "trian",
    "epoch",
    "",
    "0",
    "-1",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "mlp",
            "small_cnn",
            "soft_kl",
            "ce",
            "dkd",
            "fp16",
            "bf16",
            "cosine",
            "builtin",
            "csv",
            "mnist5k",
            "nope",
            "1e-3",
            "[1, 2]",
            "{a: 1}",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.sampled_from(KEYS), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, f"{prefix}{i}.")
    yield prefix.rstrip(".")


@st.composite
def mutated_configs(draw):
    cfg = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.sampled_from([p for p in _paths(cfg) if p]))
        node, keys = cfg, path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        new = draw(values)
        if isinstance(node, list):
            node[int(last)] = new
        elif draw(st.booleans()):
            node[last] = new
        else:
            node[draw(st.sampled_from(KEYS))] = new
    return cfg


def _run(capsys, argv) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(cfg=mutated_configs())
def test_mutated_configs_validate_or_fail_cleanly(cfg, tmp_path_factory, capsys):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, text = _run(capsys, ["validate", str(path)])
    assert code in (0, 2), text
    assert "Traceback" not in text
    if code == 2:
        assert text.lstrip().startswith("error:"), text


@FUZZ
@given(raw=st.text(max_size=200))
def test_arbitrary_yaml_text_fails_cleanly(raw, tmp_path_factory, capsys):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(raw)
    code, text = _run(capsys, ["validate", str(path)])
    assert code == 2 and "Traceback" not in text and text.lstrip().startswith("error:"), text


@FUZZ
@given(
    key=st.sampled_from(
        [
            "train.epochs",
            "train.lr",
            "distill.losses.1.params.temperature",
            "train",
            "x.y",
            "distill.losses.9.weight",
            "run.seeds",
            "teacher.members.0.model.kwargs.hidden",
            "",
        ]
    ),
    value=st.text(max_size=20),
)
def test_overrides_fail_cleanly(key, value, tmp_path_factory, capsys):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(yaml.safe_dump(VALID))
    code, text = _run(capsys, ["validate", str(path), "--set", f"{key}={value}"])
    assert code in (0, 2) and "Traceback" not in text, text
