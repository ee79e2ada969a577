"""Feature taps: capture intermediate activations by module path with forward hooks, never by forking model code.

A path names a module as `named_modules()` does ("layer2.1.conv1", "encoder.layer.3"), with two extras:
  - an integer segment may index a ModuleList/Sequential from the end: "encoder.layer.-1" is the last layer;
  - a suffix "#k" takes element k of a module that returns a tuple: "encoder.layer.0.attention.self#1" is the
    attention probabilities of a transformers BERT self-attention (which returns (context, probabilities)).
Without "#k", a tuple/list output gives its element 0 and a dict or transformers ModelOutput its first value.
Features are keyed by the path exactly as written, so a loss reads back what it asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdkit.errors import CompatibilityError
from kdkit.registry import suggest

# Where transformer families keep their blocks (most specific first: wrapped models before bare ones).
LAYER_CONTAINERS = (
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "distilbert.transformer.layer",
    "model.decoder.layers",
    "model.layers",
    "transformer.h",
    "encoder.layer",
    "transformer.layer",
    "layers",
    "blocks",
)


def split_path(path: str, where: str) -> tuple[str, int | None]:
    """ "a.b#1" -> ("a.b", 1); "a.b" -> ("a.b", None). A malformed "#k" is a CompatibilityError naming `where`."""
    module_path, sep, element = path.partition("#")
    if not sep:
        return path, None
    if not element.isdecimal():
        raise CompatibilityError(f"{where}: path {path!r} ends in '#{element}'; expected '#k' with k a tuple index ≥ 0")
    return module_path, int(element)


def resolve_module(model: nn.Module, module_path: str, where: str) -> tuple[str, nn.Module]:
    """The canonical `named_modules()` path and the module for `module_path` (negative indices resolved).

    Unknown names raise one CompatibilityError line naming `where`, the path and up to 3 close matches; an index
    past the end of a ModuleList/Sequential names the container and its length.
    """
    modules = dict(model.named_modules())
    if module_path in modules:
        return module_path, modules[module_path]
    current, parts = model, []
    for segment in module_path.split("."):
        child = current._modules.get(segment)
        if child is None and _is_int(segment) and isinstance(current, (nn.ModuleList, nn.Sequential)):
            n, i = len(current), int(segment)
            if not -n <= i < n:
                container = ".".join(parts) or "the model"
                raise CompatibilityError(
                    f"{where}: index {i} in {module_path!r} is out of range: {container} has {n} modules (0..{n - 1})"
                )
            segment = str(i % n)
            child = current._modules.get(segment)
        if child is None:
            names = [k for k in modules if k]
            raise CompatibilityError(f"{where}: no module {module_path!r}{suggest(module_path, names)}")
        current = child
        parts.append(segment)
    return ".".join(parts), current


def _is_int(segment: str) -> bool:
    return segment.removeprefix("-").isdecimal()


def pick_output(output: Any, element: int | None) -> Any:
    """The tensor a tap keeps from a module's output (see the module docstring); raises IndexError/TypeError."""
    if isinstance(output, Mapping):  # dict or transformers ModelOutput (whose values() skips None fields)
        values = list(output.values())
        return values[element or 0]
    if isinstance(output, (tuple, list)):
        return output[element or 0]
    if element not in (None, 0):
        raise TypeError(f"the module returns a single {type(output).__name__}, not a tuple")
    return output


class FeatureTaps:
    """Forward hooks on `model` that keep the outputs of the modules at `paths` for the last forward.

    collect() hands them over (keyed by path as written) and forgets them. The hooks keep nothing beyond one
    forward: the stored features are dropped at the start of every forward of `model` and by collect(), so a
    forward whose features are never collected (an evaluation pass) does not pin memory or stale values.
    They work under torch.inference_mode (the teacher side) and record what the module returned (in training,
    after its dropout). A module called several times in one forward keeps its last call.
    Use as a context manager, or call remove() when done.
    """

    def __init__(self, model: nn.Module, paths: list[str], where: str):
        self.where = where
        self.paths = list(dict.fromkeys(paths))  # de-duplicated, in order
        self._features: dict[str, torch.Tensor] = {}
        self._handles = []
        targets = []
        for path in self.paths:  # validate every path before hooking anything
            module_path, element = split_path(path, where)
            _, module = resolve_module(model, module_path, where)
            targets.append((path, element, module))
        self._handles.append(model.register_forward_pre_hook(self._clear))
        for path, element, module in targets:
            self._handles.append(module.register_forward_hook(self._hook(path, element)))

    def _clear(self, module: nn.Module, args: Any) -> None:
        self._features.clear()

    def _hook(self, path: str, element: int | None):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            try:
                value = pick_output(output, element)
            except (IndexError, TypeError) as exc:
                raise CompatibilityError(
                    f"{self.where}: cannot take {path!r} from the module's output: {exc}"
                ) from None
            if value is None:
                # transformers attention modules return (context, None) unless they run in eager mode.
                raise CompatibilityError(
                    f"{self.where}: {path!r} is None in the module's output; for attention probabilities of a "
                    "transformers model, load it with attn_implementation='eager'"
                )
            if not isinstance(value, torch.Tensor):
                raise CompatibilityError(
                    f"{self.where}: module {path!r} returned a {type(value).__name__}; expected a tensor"
                )
            self._features[path] = value

        return hook

    def collect(self) -> dict[str, torch.Tensor]:
        """The features of the last forward, by path; the taps forget them."""
        features, self._features = self._features, {}
        return features

    def remove(self) -> None:
        """Detach every hook (idempotent) and drop stored features."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._features = {}

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def layer_container(model: nn.Module) -> str | None:
    """The path of the ModuleList that holds a transformer's blocks, or None when there is no known one.

    Known names (LAYER_CONTAINERS) are tried in order at the top of the model, then as suffixes of deeper paths
    (a wrapped model: "net.bert.encoder.layer"), where exactly one match is required.
    """
    lists = {name: m for name, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))}
    for name in LAYER_CONTAINERS:
        if name in lists and len(lists[name]) > 0:
            return name
    for name in LAYER_CONTAINERS:
        deeper = [p for p in lists if p.endswith("." + name) and len(lists[p]) > 0]
        if len(deeper) == 1:
            return deeper[0]
    return None


def uniform_layer_map(n_student: int, n_teacher: int) -> dict[int, int]:
    """Uniform spacing (DistilBERT/TinyBERT): student layer i ↔ teacher layer round((i+1)·n_teacher/n_student) − 1.

    0-based on both sides; the last student layer maps to the last teacher layer. Rounding is half-up, computed in
    integers (Python's round() rounds halves to even, which would make the map depend on parity).
    uniform_layer_map(2, 6) == {0: 2, 1: 5}; uniform_layer_map(3, 12) == {0: 3, 1: 7, 2: 11}.
    """
    if n_student < 1 or n_teacher < n_student:
        raise ValueError(f"uniform layer map needs 1 ≤ student layers ≤ teacher layers; got {n_student}, {n_teacher}")
    return {i: (2 * (i + 1) * n_teacher + n_student) // (2 * n_student) - 1 for i in range(n_student)}


def get_feature(features: Mapping[str, torch.Tensor], path: str, where: str) -> torch.Tensor:
    """features[path], or a CompatibilityError naming `where` and the tapped paths (a wiring problem)."""
    value = features.get(path)
    if value is None:
        tapped = ", ".join(features) or "none"
        raise CompatibilityError(f"{where}: no tapped feature {path!r} (tapped: {tapped})")
    return value


def layer_count(model: nn.Module, container: str | None, side: str, where: str) -> tuple[str, int]:
    """(container path, number of layers) for `side` ("student"/"teacher"); `container` None means find it."""
    name = container if container is not None else layer_container(model)
    if name is None:
        raise CompatibilityError(
            f"{where}: cannot find the {side}'s list of layers (looked for {', '.join(LAYER_CONTAINERS)}); "
            f"set {side}_container to the path of its ModuleList"
        )
    path, module = resolve_module(model, name, where)
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        raise CompatibilityError(f"{where}: {side} module {name!r} is a {type(module).__name__}; expected a ModuleList")
    return path, len(module)


def layer_pairs(
    layer_map: str | Mapping[int, int],
    student_model: nn.Module,
    teacher_models: list[nn.Module],
    where: str,
    student_container: str | None = None,
    teacher_container: str | None = None,
) -> list[tuple[str, str]]:
    """Turn "uniform" or {student index: teacher index} into [("container.i", "container.j")] module paths.

    Indices may be negative (from the end); an index outside the layer list is a CompatibilityError naming the
    index and the layer count. Every teacher (ensemble members) must have the same container and layer count,
    because their features are read under one path.
    """
    s_path, n_s = layer_count(student_model, student_container, "student", where)
    if not teacher_models:
        raise CompatibilityError(f"{where}: layer maps need a teacher model")
    found = {layer_count(m, teacher_container, "teacher", where) for m in teacher_models}
    if len(found) > 1:
        desc = ", ".join(f"{p} ({n} layers)" for p, n in sorted(found))
        raise CompatibilityError(f"{where}: the teachers' layer lists differ: {desc}; features need one layout")
    t_path, n_t = found.pop()
    if layer_map == "uniform":
        if n_s > n_t:
            raise CompatibilityError(
                f"{where}: a uniform layer map needs a student no deeper than the teacher; {s_path} has {n_s} "
                f"layers, {t_path} has {n_t}: give an explicit layer_map"
            )
        layer_map = uniform_layer_map(n_s, n_t)
    pairs = []
    for i, j in layer_map.items():
        for side, idx, path, n in (("student", i, s_path, n_s), ("teacher", j, t_path, n_t)):
            if not -n <= idx < n:
                raise CompatibilityError(
                    f"{where}: {side} layer {idx} is out of range: {path} has {n} layers (0..{n - 1})"
                )
        pairs.append((_join(s_path, i % n_s), _join(t_path, j % n_t)))
    return pairs


def _join(container: str, index: int) -> str:
    return f"{container}.{index}" if container else str(index)


def parse_layer_map(layer_map: Any) -> str | dict[int, int] | dict[str, str]:
    """Validate a layer map as a loss receives it from a config: "uniform", {student index: teacher index} or
    {student path: teacher path}. Integer-like strings count as indices ({"0": "2"} is {0: 2}), because JSON
    turns integer keys into strings; so a path made only of digits must be given as an index. ValueError if bad.
    """
    if layer_map == "uniform":
        return "uniform"
    if not isinstance(layer_map, Mapping) or not layer_map:
        raise ValueError(
            f"layer_map={layer_map!r}; expected 'uniform', {{student index: teacher index}} "
            "or {student module path: teacher module path}"
        )
    items = list(layer_map.items())
    if all(_int_like(k) and _int_like(v) for k, v in items):
        return {int(k): int(v) for k, v in items}
    if all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in items):
        return dict(items)
    raise ValueError(
        f"layer_map={dict(layer_map)!r}; use either layer indices ({{1: 3}}) or module paths "
        "({'encoder.layer.1': 'encoder.layer.3'}) for every entry"
    )


def _int_like(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    return isinstance(x, int) or (isinstance(x, str) and _is_int(x))
