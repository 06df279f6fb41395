"""Start-up validation of a recipe's config: every problem in one error, before anything is built.

torchtune's recipes read keys with ``cfg.get(key, default)`` wherever they need them, so a typo
(``clip_grad_nrom``) or a key the recipe never reads (``clip_grad_norm`` in torchtune's DPO
recipe) is silently ignored. A prefopt recipe declares its keys once as a ``{name: Key}`` spec;
:func:`validate_config` rejects unknown keys (suggesting the closest valid name), missing
required keys, wrong types and out-of-range values, and checks each ``_component_`` block's
arguments against the component's signature -- all listed in one :class:`ConfigError`.
"""

import difflib
import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["Key", "ConfigError", "validate_config", "positive", "non_negative", "at_least"]

_MISSING = object()


class ConfigError(ValueError):
    """Raised with every problem of a config, one per line."""


@dataclass(frozen=True)
class Key:
    """One top-level config key.

    Args:
        types: accepted Python type(s) of the value (``type(None)`` to allow null).
        default: value when absent; leave unset to make the key required.
        check: ``value -> problem message or None``, for range checks.
        component: the value is a ``{_component_: ..., **kwargs}`` block (or a list of them).
        doc: one line shown in errors.
    """

    types: Union[type, Tuple[type, ...]] = object
    default: Any = _MISSING
    check: Optional[Callable[[Any], Optional[str]]] = None
    component: bool = False
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is _MISSING


def positive(v: Any) -> Optional[str]:
    return None if v is None or v > 0 else f"must be > 0, got {v}"


def non_negative(v: Any) -> Optional[str]:
    return None if v is None or v >= 0 else f"must be >= 0, got {v}"


def at_least(n: float) -> Callable[[Any], Optional[str]]:
    return lambda v: None if v is None or v >= n else f"must be >= {n}, got {v}"


def one_of(*choices: Any) -> Callable[[Any], Optional[str]]:
    return lambda v: None if v in choices else f"must be one of {list(choices)}, got {v!r}"


def _resolve(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    if not module:
        raise ImportError(f"{path!r} is not a dotted path")
    obj = importlib.import_module(module)
    return getattr(obj, attr)


def _check_component(where: str, block: Any, bound: Tuple[str, ...]) -> List[str]:
    """Problems with one ``_component_`` block: unresolvable target, unknown or missing args."""
    if not isinstance(block, (dict, DictConfig)) or "_component_" not in block:
        return [f"{where}: expected a block with a _component_ key, got {block!r:.80}"]
    target = block["_component_"]
    try:
        fn = _resolve(str(target))
    except (ImportError, AttributeError) as e:
        return [f"{where}._component_: cannot import {target!r} ({e})"]
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    given = [k for k in block.keys() if k != "_component_"]
    problems = []
    valid = [n for n in params if n not in bound and n != "self"]
    for k in given:
        if k not in params:
            close = difflib.get_close_matches(str(k), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}.{k}: not an argument of {target}{hint}")
    for n, p in params.items():
        if n in bound or n == "self" or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty and n not in given:
            problems.append(f"{where}.{n}: required argument of {target} is missing")
    return problems


def validate_config(
    cfg: DictConfig,
    spec: Mapping[str, Key],
    *,
    bound_args: Optional[Mapping[str, Tuple[str, ...]]] = None,
    extra_checks: Optional[Callable[[Dict[str, Any]], List[str]]] = None,
) -> Dict[str, Any]:
    """Check ``cfg`` against ``spec``; return the plain values (defaults filled in).

    Args:
        cfg (DictConfig): the parsed config (after command-line overrides).
        spec (Mapping[str, Key]): every key the recipe reads.
        bound_args (Optional[Mapping[str, Tuple[str, ...]]]): for component keys, the arguments
            the recipe passes itself (e.g. ``{"optimizer": ("params",)}``); they must not be given.
        extra_checks: ``values -> [problems]`` for cross-key rules (after the per-key checks).

    Returns:
        Dict[str, Any]: ``{key: value}`` for every key of ``spec``; component blocks stay
        ``DictConfig``/``ListConfig`` for ``torchtune.config.instantiate``.

    Raises:
        ConfigError: listing every problem found, one per line.
    """
    bound_args = bound_args or {}
    problems: List[str] = []
    values: Dict[str, Any] = {}
    for k in cfg.keys():
        if k not in spec:
            close = difflib.get_close_matches(str(k), list(spec), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{k}: unknown config key{hint}")
    for name, key in spec.items():
        if name not in cfg:
            if key.required:
                problems.append(f"{name}: missing required key" + (f" ({key.doc})" if key.doc else ""))
                continue
            value = key.default
        else:
            value = cfg[name]
        if key.component:
            # torchtune's CLI turns `key=null` for a component block into `key._component_: null`:
            # both mean "disabled" for an optional component.
            if isinstance(value, (dict, DictConfig)) and "_component_" in value and value["_component_"] is None:
                value = None
            if value is None and not key.required:
                values[name] = None
                continue
            blocks = list(value) if isinstance(value, (list, ListConfig)) else [value]
            for i, b in enumerate(blocks):
                where = f"{name}[{i}]" if len(blocks) > 1 else name
                problems += _check_component(where, b, bound_args.get(name, ()))
            values[name] = value
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        types = key.types if isinstance(key.types, tuple) else (key.types,)
        # bool is an int in Python; never accept it where a number is meant.
        if isinstance(value, bool) and bool not in types:
            ok = False
        elif isinstance(value, int) and float in types and int not in types:
            ok, value = True, float(value)
        else:
            ok = isinstance(value, types)
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{name}: expected {names}, got {type(value).__name__} {value!r:.60}")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{name}: must be finite, got {value}")
            continue
        if key.check is not None:
            msg = key.check(value)
            if msg:
                problems.append(f"{name}: {msg}")
                continue
        values[name] = value
    if not problems and extra_checks is not None:
        problems += extra_checks(values)
    if problems:
        raise ConfigError(
            f"{len(problems)} problem(s) in the config:\n  - " + "\n  - ".join(problems)
        )
    return values
