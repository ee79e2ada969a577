"""Lookup in literal registries with "did you mean", and binding of parameters against a signature.

Registries are plain dicts written out in one place (LOSSES in kdkit.losses, MODELS in kdkit.models, ...).
Nothing registers itself on import.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from kdkit.errors import ConfigError

T = TypeVar("T")


def suggest(name: str, choices: list[str] | Mapping[str, Any], n: int = 3) -> str:
    """' (did you mean: a, b?)' for the closest choices, or '' when none is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def lookup(registry: Mapping[str, T], name: str, where: str) -> T:
    """registry[name], or a ConfigError naming the field, the value, the choices and the closest match."""
    if name in registry:
        return registry[name]
    choices = ", ".join(sorted(registry))
    raise ConfigError(f"{where}: unknown name {name!r}{suggest(name, registry)}; expected one of: {choices}")


def bind(
    fn: Callable[..., Any], params: Mapping[str, Any], where: str, provided: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check `params` against the signature of `fn` (a class or function); report every problem at once.

    `provided` names arguments that kdkit passes itself (for example num_classes), which the user must not set.
    Returns the keyword arguments to call `fn` with (without the provided ones).
    """
    sig = inspect.signature(fn)
    accepted = {
        n: p for n, p in sig.parameters.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    problems = []
    for key in params:
        if key in provided:
            problems.append(f"{where}.{key}: set by kdkit, remove it from the config")
        elif key not in accepted and not takes_kwargs:
            allowed = sorted(k for k in accepted if k not in provided)
            problems.append(
                f"{where}.{key}: unknown parameter{suggest(key, allowed)}; accepted: {', '.join(allowed) or 'none'}"
            )
    for n, p in accepted.items():
        if p.default is inspect.Parameter.empty and n not in params and n not in provided:
            problems.append(f"{where}.{n}: required parameter is missing")
    if problems:
        if len(problems) == 1:
            raise ConfigError(problems[0])
        raise ConfigError(f"{where}: {len(problems)} problems", details=problems)
    return dict(params)
