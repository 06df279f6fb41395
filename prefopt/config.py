"""Start-up validation of a recipe's config: every problem in one error, before anything is built.

torchtune's recipes read keys with ``cfg.get(key, default)`` wherever they need them, so a typo
(``clip_grad_nrom``) or a key the recipe never reads (``clip_grad_norm`` in torchtune's DPO
recipe) is silently ignored. A prefopt recipe declares its keys once as a ``{name: Key}`` spec;
:func:`validate_config` rejects unknown keys (suggesting the closest valid name), missing
required keys, wrong types and out-of-range values, and checks each ``_component_`` block's
arguments against the component's signature (names, annotated types, and the ranges of known
numeric arguments such as ``lr`` or ``betas``) -- all listed in one :class:`ConfigError`.
"""

import collections.abc
import difflib
import importlib
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["Key", "ConfigError", "validate_config", "positive", "non_negative", "at_least", "load_config_file", "parse"]

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


def unit_interval(v: Any) -> Optional[str]:
    """In (0, 1] (e.g. a sampler's top_p), or None."""
    return None if v is None or 0 < v <= 1 else f"must be in (0, 1], got {v}"


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


def _type_problem(value: Any, ann: Any) -> Optional[str]:
    """Why ``value`` (a plain YAML value) does not fit the annotation ``ann``, or None if it fits
    or the annotation is not one we can check (a class, a Tensor, a callable, ...: the component
    itself decides). Numbers: int fits float; bool never fits int or float."""
    if ann is inspect.Parameter.empty or ann is Any or isinstance(ann, (str, typing.TypeVar)):
        return None
    origin = typing.get_origin(ann)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(ann, types.UnionType)):
        alts = typing.get_args(ann)
        results = [_type_problem(value, a) for a in alts]
        if any(r is None for r in results):
            return None
        return " or ".join(dict.fromkeys(r for r in results if r != "Tensor")) or "Tensor"
    if origin is typing.Literal:
        return None if value in typing.get_args(ann) else f"one of {list(typing.get_args(ann))}"
    if origin in (tuple, list, typing.Sequence, collections.abc.Sequence):
        if not isinstance(value, (list, tuple, ListConfig)):
            return _type_name(ann)
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in typing.get_args(ann) and len(args) != len(value):
            return f"{_type_name(ann)} of {len(args)} items"
        for i, x in enumerate(value):
            a = args[min(i, len(args) - 1)] if args else Any
            if _type_problem(x, a) is not None:
                return _type_name(ann)
        return None
    if ann is type(None) or ann is None:
        return None if value is None else "null"
    if ann is bool:
        return None if isinstance(value, bool) else "bool"
    if ann is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "int"
    if ann is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "float"
    if ann is str:
        return None if isinstance(value, str) else "str"
    if getattr(ann, "__module__", "") == "torch" and getattr(ann, "__name__", "") == "Tensor":
        return "Tensor"  # a YAML value is never one (AdamW's `lr: float | Tensor` must be a float)
    return None  # any other class: not checkable from YAML


def _type_name(ann: Any) -> str:
    if ann is type(None) or ann is None:
        return "null"
    if isinstance(ann, type) and typing.get_origin(ann) is None:
        return ann.__name__
    return str(ann).replace("typing.", "")


def _in_unit(v: Any) -> Optional[str]:
    return None if 0 <= v < 1 else f"must be in [0, 1), got {v}"


# Arguments whose values are known by name, whatever the component: a learning rate of -1e-3 or a
# beta of 1.5 fails at start-up, not after the model is built (torch checks them only when the
# optimizer is created). Checked only when the value is a number (or a list of numbers).
KNOWN_NUMERIC_ARGS: Dict[str, Callable[[Any], Optional[str]]] = {
    "lr": non_negative,
    "weight_decay": non_negative,
    "eps": positive,
    "momentum": non_negative,
    "betas": _in_unit,
    "num_warmup_steps": non_negative,
    "lora_rank": at_least(1),
    "lora_alpha": positive,
    "lora_dropout": _in_unit,
}


def _value_problems(where: str, name: str, value: Any, ann: Any) -> List[str]:
    """Type (from the signature's annotation) and known-range problems of one component argument."""
    if isinstance(value, (DictConfig, ListConfig)):
        try:
            value = OmegaConf.to_container(value, resolve=True)
        except Exception:  # noqa: BLE001 - an unresolvable interpolation is reported by the component
            return []
    expected = _type_problem(value, ann)
    if expected is not None:
        return [f"{where}.{name}: expected {expected}, got {type(value).__name__} {value!r:.60}"]
    check = KNOWN_NUMERIC_ARGS.get(name)
    numbers = value if isinstance(value, list) else [value]
    if check is None or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
        return []
    for x in numbers:
        if not math.isfinite(x):
            return [f"{where}.{name}: must be finite, got {x}"]
        msg = check(x)
        if msg:
            return [f"{where}.{name}: {msg}"]
    return []


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
        sig = inspect.signature(fn, eval_str=True)
    except (TypeError, ValueError, NameError):
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
        else:
            try:
                value = block[k]
            except Exception:  # noqa: BLE001 - an unresolvable interpolation: the component reports it
                continue
            problems += _value_problems(where, str(k), value, params[k].annotation)
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
    component_checks: Optional[Callable[[Dict[str, Any]], List[str]]] = None,
) -> Dict[str, Any]:
    """Check ``cfg`` against ``spec``; return the plain values (defaults filled in).

    Args:
        cfg (DictConfig): the parsed config (after command-line overrides).
        spec (Mapping[str, Key]): every key the recipe reads.
        bound_args (Optional[Mapping[str, Tuple[str, ...]]]): for component keys, the arguments
            the recipe passes itself (e.g. ``{"optimizer": ("params",)}``); they must not be given.
            A value may be a function ``block -> names`` where they depend on the component.
        extra_checks: ``values -> [problems]`` for cross-key rules (after the per-key checks).
        component_checks: ``values -> [problems]`` found by building components or looking at
            files (e.g. :func:`prefopt.startup.component_problems`); run even when other keys
            have problems, on the keys that have none of their own, so that the one error lists
            them all.

    Returns:
        Dict[str, Any]: ``{key: value}`` for every key of ``spec``; component blocks stay
        ``DictConfig``/``ListConfig`` for ``torchtune.config.instantiate``.

    Raises:
        ConfigError: listing every problem found, one per line.
    """
    bound_args = bound_args or {}
    problems: List[str] = []
    values: Dict[str, Any] = {}
    bad: set = set()  # component keys whose block has problems: not given to component_checks
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
                bound = bound_args.get(name, ())
                if callable(bound):  # decided by the block (e.g. a reward callable's own parameters)
                    bound = tuple(bound(b))
                found = _check_component(where, b, bound)
                problems += found
                if found:
                    bad.add(name)
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
    if component_checks is not None:
        problems += component_checks({k: v for k, v in values.items() if k not in bad})
    if problems:
        raise ConfigError(
            f"{len(problems)} problem(s) in the config:\n  - " + "\n  - ".join(problems)
        )
    return values


def load_config_file(path: Any) -> DictConfig:
    """A recipe config file, read as ``tune run --config`` reads it, or one clear error.

    Raises:
        ConfigError: naming the file: it does not exist, is not valid YAML (with the line), or its
            top level is not a mapping of keys (a YAML list, a plain value, an empty file).
    """
    import yaml

    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(cfg, DictConfig) or not len(cfg):
        what = "a YAML list" if isinstance(cfg, ListConfig) else "empty"
        raise ConfigError(f"{path}: the config is {what}, not a mapping of keys (`key: value` lines, as in configs/tiny/simpo_lora.yaml)")
    return cfg


def parse(recipe_main: Callable[[DictConfig], Any]) -> Callable[..., Any]:
    """torchtune's ``@config.parse`` (same use, delegating to it), with the ``--config`` file
    checked first: a config that is a YAML list, bad YAML or no file stops the recipe with one
    line naming the file and the problem (exit status 2), where torchtune's parser raises a raw
    ``TypeError``/``ScannerError`` traceback.

    Use on a recipe's main function::

        @prefopt.config.parse
        def recipe_main(cfg: DictConfig) -> None: ...

    Raises:
        SystemExit: (status 2) with ``<recipe file>: <file>: <problem>`` from
            :func:`load_config_file`. Without ``--config`` torchtune's parser reports it.
    """
    import argparse
    import functools
    import sys
    from pathlib import Path

    from torchtune.config import parse as tune_parse

    tune_main = tune_parse(recipe_main)

    @functools.wraps(recipe_main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        peek = argparse.ArgumentParser(add_help=False)
        peek.add_argument("--config")
        known, _ = peek.parse_known_args()
        if known.config is not None:
            try:
                load_config_file(known.config)
            except ConfigError as e:
                # the recipe's file name (`tune run` may run it as a module: argv[0] a dotted name)
                print(f"{Path(recipe_main.__code__.co_filename).name}: {e}", file=sys.stderr)
                raise SystemExit(2) from None
        return tune_main(*args, **kwargs)

    return wrapper
