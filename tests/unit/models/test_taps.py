"""Feature taps (forward hooks by module path), layer containers and maps, and adapters."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from kdkit.errors import CompatibilityError
from kdkit.models.adapters import make_adapter
from kdkit.models.taps import (
    FeatureTaps,
    layer_container,
    layer_pairs,
    parse_layer_map,
    uniform_layer_map,
)


class PairOut(nn.Module):
    """Returns a tuple (x + 1, 2x), like an attention module returning (context, probabilities)."""

    def forward(self, x):
        return x + 1, 2 * x


class DictOut(nn.Module):
    def forward(self, x):
        return {"first": x - 1, "second": x * 3}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.pair = PairOut()
        self.dict_out = DictOut()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = torch.relu(b(x))
        x, _ = self.pair(x)
        x = self.dict_out(x)["first"]
        return self.head(x)


def test_features_equal_the_module_outputs():
    net, x = Net(), torch.randn(5, 4)
    with FeatureTaps(net, ["stem", "blocks.1", "head"], "student.model") as taps:
        net(x)
        got = taps.collect()
    assert list(got) == ["stem", "blocks.1", "head"]
    stem = net.stem(x)
    b0 = torch.relu(net.blocks[0](stem))
    torch.testing.assert_close(got["stem"], stem)
    torch.testing.assert_close(got["blocks.1"], net.blocks[1](b0))  # the Linear's own output, before the relu
    torch.testing.assert_close(got["head"], net(x))


def test_unknown_path_is_one_line_naming_where_and_close_matches():
    with pytest.raises(CompatibilityError) as err:
        FeatureTaps(Net(), ["blocks.1", "block.2"], "student.model")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("student.model: no module 'block.2'")
    assert "did you mean: blocks.2" in msg


def test_nothing_is_hooked_when_a_path_is_bad():
    net = Net()
    with pytest.raises(CompatibilityError):
        FeatureTaps(net, ["stem", "nope"], "teacher")
    assert not net.stem._forward_hooks and not net._forward_pre_hooks


def test_negative_index_takes_the_last_layer_and_out_of_range_names_the_length():
    net, x = Net(), torch.randn(2, 4)
    with FeatureTaps(net, ["blocks.-1"], "student.model") as taps:
        net(x)
        got = taps.collect()["blocks.-1"]  # keyed as written
    with FeatureTaps(net, ["blocks.2"], "student.model") as taps:
        net(x)
        torch.testing.assert_close(got, taps.collect()["blocks.2"])
    for bad in ("blocks.3", "blocks.-4"):
        with pytest.raises(CompatibilityError, match=r"out of range: blocks has 3 modules \(0\.\.2\)"):
            FeatureTaps(net, [bad], "student.model")


def test_hash_k_takes_a_tuple_element_and_dicts_give_their_first_value():
    net, x = Net(), torch.randn(3, 4)
    with FeatureTaps(net, ["pair", "pair#1", "dict_out", "dict_out#1"], "t") as taps:
        net(x)
        got = taps.collect()
    inner = torch.relu(net.blocks[2](torch.relu(net.blocks[1](torch.relu(net.blocks[0](net.stem(x)))))))
    torch.testing.assert_close(got["pair"], inner + 1)
    torch.testing.assert_close(got["pair#1"], 2 * inner)
    torch.testing.assert_close(got["dict_out"], inner)  # (inner + 1) - 1
    torch.testing.assert_close(got["dict_out#1"], (inner + 1) * 3)


def test_bad_element_index_is_a_compatibility_error():
    net = Net()
    with pytest.raises(CompatibilityError, match="'#x'"):
        FeatureTaps(net, ["pair#x"], "t")
    for path, why in (("pair#5", "tuple index out of range"), ("stem#1", "returns a single Tensor, not a tuple")):
        with FeatureTaps(net, [path], "t"):
            with pytest.raises(CompatibilityError, match=f"t: cannot take '{path}' .*{why}"):
                net(torch.randn(1, 4))


def test_works_under_inference_mode():
    net, x = Net(), torch.randn(2, 4)
    with FeatureTaps(net, ["blocks.0"], "teacher") as taps:
        with torch.inference_mode():
            net(x)
        got = taps.collect()["blocks.0"]
    assert got.is_inference()
    torch.testing.assert_close(got, net.blocks[0](net.stem(x)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x, use_b: bool = True):
        x = self.a(x)
        return self.b(x) if use_b else x


def test_collect_clears_and_a_new_forward_drops_uncollected_features():
    net = Branchy()
    taps = FeatureTaps(net, ["a", "b"], "student.model")
    with torch.no_grad():
        net(torch.randn(2, 2))
        assert set(taps.collect()) == {"a", "b"}
        assert taps.collect() == {}
        net(torch.randn(2, 2))  # an evaluation pass whose features nobody collects
        uncollected = weakref.ref(taps._features["b"])
        net(torch.randn(2, 2), use_b=False)  # b does not run: its old output must be neither kept nor returned
        gc.collect()
        assert uncollected() is None
        assert set(taps.collect()) == {"a"}
    taps.remove()


def test_taps_hold_no_reference_after_collect_or_remove():
    net = Branchy()
    taps = FeatureTaps(net, ["b"], "student.model")
    with torch.no_grad():
        net(torch.randn(2, 2))
        ref = weakref.ref(taps.collect()["b"])
        gc.collect()
        assert ref() is None
        net(torch.randn(2, 2))
        ref = weakref.ref(taps._features["b"])
        taps.remove()
        gc.collect()
        assert ref() is None


def test_remove_detaches_every_hook():
    net = Net()
    taps = FeatureTaps(net, ["stem", "blocks.-1", "pair#1"], "student.model")
    taps.remove()
    taps.remove()  # idempotent
    net(torch.randn(2, 4))
    assert taps.collect() == {}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


class Bert(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([nn.Identity() for _ in range(n)])


def test_layer_container_finds_common_names():
    assert layer_container(Bert(2)) == "encoder.layer"
    wrapped = nn.Module()
    wrapped.bert = Bert(2)
    assert layer_container(wrapped) == "bert.encoder.layer"
    deeper = nn.Module()
    deeper.net = wrapped
    assert layer_container(deeper) == "net.bert.encoder.layer"
    gpt = nn.Module()
    gpt.transformer = nn.Module()
    gpt.transformer.h = nn.ModuleList([nn.Identity()])
    assert layer_container(gpt) == "transformer.h"
    assert layer_container(nn.Linear(2, 2)) is None


def test_uniform_layer_map():
    assert uniform_layer_map(2, 6) == {0: 2, 1: 5}
    assert uniform_layer_map(3, 12) == {0: 3, 1: 7, 2: 11}
    assert uniform_layer_map(4, 4) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert uniform_layer_map(2, 5) == {0: 2, 1: 4}  # 2.5 rounds half-up to 3 (Python's round() would give 2)
    with pytest.raises(ValueError):
        uniform_layer_map(3, 2)


def test_layer_pairs_resolve_indices_and_name_the_layer_count():
    student, teacher = Bert(2), Bert(4)
    assert layer_pairs("uniform", student, [teacher], "hidden_state") == [
        ("encoder.layer.0", "encoder.layer.1"),
        ("encoder.layer.1", "encoder.layer.3"),
    ]
    assert layer_pairs({-1: -1}, student, [teacher], "x") == [("encoder.layer.1", "encoder.layer.3")]
    with pytest.raises(CompatibilityError, match=r"teacher layer 4 is out of range: encoder.layer has 4 layers"):
        layer_pairs({0: 4}, student, [teacher], "hidden_state")
    with pytest.raises(CompatibilityError, match="set student_container"):
        layer_pairs("uniform", nn.Linear(2, 2), [teacher], "hidden_state")
    with pytest.raises(CompatibilityError, match="layer lists differ"):
        layer_pairs("uniform", student, [teacher, Bert(3)], "hidden_state")


def test_parse_layer_map():
    assert parse_layer_map("uniform") == "uniform"
    assert parse_layer_map({0: 2, "1": "-1"}) == {0: 2, 1: -1}  # JSON turns int keys into strings
    assert parse_layer_map({"a.b": "c.d"}) == {"a.b": "c.d"}
    for bad in ("all", {}, {0: "a.b"}, {True: 1}, [0, 1]):
        with pytest.raises(ValueError):
            parse_layer_map(bad)


# --- adapters ---------------------------------------------------------------------------------------------------


def test_adapter_is_identity_when_shapes_are_equal():
    assert isinstance(make_adapter((8, 4, 4), torch.Size([8, 4, 4]), "hint"), nn.Identity)


def test_conv_adapter_maps_channels_and_resizes():
    adapter = make_adapter((8, 4, 4), (16, 2, 2), "hint")
    assert isinstance(adapter[0], nn.Conv2d) and adapter[0].bias is None and adapter[0].kernel_size == (1, 1)
    assert isinstance(adapter[1], nn.BatchNorm2d)
    assert adapter(torch.randn(3, 8, 4, 4)).shape == (3, 16, 2, 2)
    no_resize = make_adapter((8, 4, 4), (16, 4, 4), "hint")
    assert len(no_resize) == 2


def test_linear_adapters():
    seq = make_adapter((5, 8), (5, 12), "hidden_state")
    assert isinstance(seq, nn.Linear) and (seq.in_features, seq.out_features) == (8, 12)
    assert seq(torch.randn(2, 5, 8)).shape == (2, 5, 12)
    vec = make_adapter((8,), (3,), "hint")
    assert vec(torch.randn(2, 8)).shape == (2, 3)


@pytest.mark.parametrize(("s", "t"), [((8, 4, 4), (16,)), ((5, 8), (6, 8)), ((2, 3, 4, 5), (2, 3, 4, 6))])
def test_incompatible_shapes_name_both(s, t):
    with pytest.raises(CompatibilityError) as err:
        make_adapter(s, t, "hint a→b")
    msg = str(err.value)
    assert msg.startswith("hint a→b:") and str(s) in msg and str(t) in msg and "(T, D)" in msg
