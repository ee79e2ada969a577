"""registry.lookup and registry.bind: "did you mean", and every problem with the parameters reported at once."""

from __future__ import annotations

import pytest

from kdkit.errors import ConfigError
from kdkit.registry import bind, lookup, suggest

REGISTRY = {"resnet18": "R18", "resnet50": "R50", "mlp": "MLP"}


def _builder(num_classes: int, width: int, depth: int = 2, *, dropout: float = 0.0):
    return None


class _Model:
    def __init__(self, num_classes: int, hidden: int = 64):
        pass


# --- lookup -------------------------------------------------------------------------------------------------------


def test_lookup_returns_the_entry():
    assert lookup(REGISTRY, "mlp", "student.name") == "MLP"


def test_lookup_unknown_names_the_field_the_value_a_suggestion_and_the_choices():
    with pytest.raises(ConfigError) as info:
        lookup(REGISTRY, "resnet5", "student.name")
    message = str(info.value)
    assert message.startswith("student.name: ")
    assert "'resnet5'" in message
    assert "did you mean: resnet50" in message
    assert "expected one of: mlp, resnet18, resnet50" in message


def test_lookup_without_a_close_name_makes_no_suggestion():
    with pytest.raises(ConfigError) as info:
        lookup(REGISTRY, "transformer", "student.name")
    assert "did you mean" not in str(info.value)
    assert "expected one of: mlp, resnet18, resnet50" in str(info.value)


def test_suggest_lists_the_closest_first_and_at_most_n():
    assert suggest("resnet5", ["resnet18", "resnet50", "mlp"]) == " (did you mean: resnet50, resnet18?)"
    assert suggest("resnet5", ["resnet18", "resnet50", "mlp"], n=1) == " (did you mean: resnet50?)"
    assert suggest("zzz", ["resnet18", "mlp"]) == ""


# --- bind ---------------------------------------------------------------------------------------------------------


def test_bind_returns_the_parameters_as_keyword_arguments():
    params = {"num_classes": 10, "width": 32, "dropout": 0.1}
    assert bind(_builder, params, "student.params") == params


def test_bind_checks_a_class_constructor_without_self():
    assert bind(_Model.__init__, {"num_classes": 3}, "student.params") == {"num_classes": 3}
    with pytest.raises(ConfigError, match=r"student\.params\.self: unknown parameter"):
        bind(_Model.__init__, {"num_classes": 3, "self": 1}, "student.params")


def test_bind_unknown_parameter_suggests_and_lists_the_accepted_ones():
    with pytest.raises(ConfigError) as info:
        bind(_builder, {"num_classes": 10, "width": 8, "dropuot": 0.1}, "student.params")
    message = str(info.value)
    assert message.startswith("student.params.dropuot: unknown parameter")
    assert "did you mean: dropout" in message
    assert "accepted: depth, dropout, num_classes, width" in message
    assert info.value.details == []  # a single problem is the message itself


def test_bind_reports_a_missing_required_parameter():
    with pytest.raises(ConfigError, match=r"^student\.params\.width: required parameter is missing$"):
        bind(_builder, {"num_classes": 10}, "student.params")


def test_bind_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        bind(_builder, {"num_classes": 10, "dropuot": 0.1, "depht": 3}, "student.params", provided=("num_classes",))
    error = info.value
    assert str(error) == "student.params: 4 problems"
    assert len(error.details) == 4
    assert any(d.startswith("student.params.num_classes: set by kdkit") for d in error.details)
    assert any(d.startswith("student.params.dropuot: unknown parameter") and "dropout" in d for d in error.details)
    assert any(d.startswith("student.params.depht: unknown parameter") and "depth" in d for d in error.details)
    assert "student.params.width: required parameter is missing" in error.details
    assert error.lines()[1:] == [f"  - {d}" for d in error.details]


def test_bind_rejects_a_provided_parameter_and_does_not_require_it():
    with pytest.raises(ConfigError, match=r"^student\.params\.num_classes: set by kdkit"):
        bind(_Model.__init__, {"num_classes": 3}, "student.params", provided=("num_classes",))
    # Missing is fine: kdkit passes it itself, so it is not in the returned arguments either.
    assert bind(_Model.__init__, {"hidden": 8}, "student.params", provided=("num_classes",)) == {"hidden": 8}


def test_bind_does_not_suggest_provided_parameters():
    with pytest.raises(ConfigError) as info:
        bind(_Model.__init__, {"num_clases": 3}, "student.params", provided=("num_classes",))
    message = str(info.value)
    assert "did you mean" not in message
    assert "accepted: hidden" in message


def test_bind_accepts_anything_when_the_signature_takes_kwargs():
    def fn(a: int = 1, **kwargs):
        return None

    assert bind(fn, {"a": 2, "anything": 3}, "x.params") == {"a": 2, "anything": 3}


def test_bind_with_no_accepted_parameters_says_none():
    def fn():
        return None

    with pytest.raises(ConfigError, match=r"x\.params\.a: unknown parameter; accepted: none"):
        bind(fn, {"a": 1}, "x.params")
