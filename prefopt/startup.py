"""The start-up checks that need the components: what :func:`prefopt.config.validate_config` can
only find by building the cheap ones (the loss, the optimizer, the model on the meta device) or
by looking at the files the config names, so that a run that would fail later -- at the first
long pair, or after minutes of loading weights -- fails at start-up, in the one config error.

Both recipes pass :func:`component_problems` to ``validate_config(component_checks=...)``; after
the learning-rate schedule is built they log :func:`zero_lr_warning`. Nothing here reads a
weight, a data row or a token: a meta-device model has no storage, and the data checks list
folders and stat files only.
"""

import inspect
import re
import warnings
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config

from prefopt.config import _resolve  # a dotted path to its object, as config.instantiate resolves it
from prefopt.data.sources import data_files_problems, expand_data_files

__all__ = ["component_problems", "model_max_seq_len", "instantiation_problems", "zero_lr_warning"]

DATASET_KEYS = ("dataset", "eval_dataset")


def model_max_seq_len(block: Any) -> Optional[int]:
    """The ``max_seq_len`` of the model a ``model`` block builds, read from a meta-device copy (no
    memory, no weights), or None if it cannot be built there or has no such attribute (the real
    build then reports its own error). A QLoRA builder is asked for an unquantized base: the
    length is the same, and NF4 on the meta device takes seconds (12 s for an 8B)."""
    try:
        kwargs = {}
        if "quantize_base" in inspect.signature(_resolve(block["_component_"])).parameters:
            kwargs["quantize_base"] = False
        with torch.device("meta"):
            model = config.instantiate(block, **kwargs)
    except Exception:  # noqa: BLE001 - e.g. a quantized base that needs real storage: not checked here
        return None
    n = getattr(model, "max_seq_len", None)
    return n if isinstance(n, int) else None


def instantiation_problems(key: str, block: Any, *args: Any) -> List[str]:
    """Build ``block`` (a ``_component_`` block) with ``args``; each ``ValueError`` or
    ``TypeError`` it raises becomes a config problem naming ``<key>.<arg>`` for the first of the
    block's own arguments that the message mentions (``loss.beta: ...``), else ``<key>``.

    A component stops at its first bad argument, so that argument is then left out (its default
    used) and the block built again, to list the others too (``loss.beta=0`` and
    ``loss.gamma=-1`` in one error). Returns ``[]`` if it builds.
    """
    problems: List[str] = []
    try:  # plain values: the copies below lose the config root that interpolations refer to
        plain = OmegaConf.to_container(block, resolve=True) if isinstance(block, DictConfig) else dict(block)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: the component reports it when built
        return []
    for _ in range(len(plain) + 1):
        try:
            config.instantiate(OmegaConf.create(plain), *args)
            return problems
        except (ValueError, TypeError) as e:
            msg = str(e).strip() or type(e).__name__
        given = [str(k) for k in plain if k != "_component_"]
        found = [(m.start(), k) for k in given if (m := re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", msg, re.IGNORECASE))]
        if not found:
            return problems + [f"{key}: {msg}"]
        arg = min(found)[1]
        problems.append(f"{key}.{arg}: {msg}")
        plain = {k: v for k, v in plain.items() if k != arg}
    return problems


def _blocks(key: str, value: Any) -> List[Tuple[str, Any]]:
    """``[(where, block)]`` of a data set key: one block, or ``key[i]`` for each of a list."""
    if isinstance(value, (list, ListConfig)):
        return [(f"{key}[{i}]", b) for i, b in enumerate(value)]
    return [(key, value)]


def _dataset_problems(where: str, block: Any, model_len: Optional[int], model_given: bool) -> List[str]:
    """Files, split and ``max_seq_len`` of one data set block (a plain dict, resolved)."""
    problems = []
    source, files = block.get("source"), block.get("data_files")
    if isinstance(source, str) and files is not None:
        found = data_files_problems(source, str(block.get("split", "train")), files, key=where)
        problems += found
        if not found:
            try:  # a folder: the files in it of the source's kind, or an error naming it
                expand_data_files(source, files)
            except ValueError as e:
                problems.append(f"{where}.{e}")
    n = block.get("max_seq_len")
    model = f"model.max_seq_len={model_len}" if model_given else f"the model's max_seq_len ({model_len}, its builder's default)"
    if model_len is not None and isinstance(n, int) and not isinstance(n, bool) and n > model_len:
        problems.append(
            f"{where}.max_seq_len: {n} is larger than {model}: a pair longer than {model_len} tokens would crash "
            f"the run at the step that reaches it; set {where}.max_seq_len to at most {model_len}"
        )
    elif model_len is not None and n is None and _truncates(block):
        # null is "never truncate": the first pair longer than the model's positions ends the run mid-way
        problems.append(
            f"{where}.max_seq_len: {'null' if 'max_seq_len' in block else 'not set'} (pairs are never truncated), but "
            f"the model has {model}: a pair longer than {model_len} tokens would crash the run at the step that "
            f"reaches it; set {where}.max_seq_len to at most {model_len}"
        )
    return problems


def _truncates(block: Any) -> bool:
    """Whether a data set block builds a prefopt preference data set (whose ``max_seq_len`` is
    the truncation length); another builder's keys are its own."""
    return str(block.get("_component_", "")).startswith("prefopt.data")


def component_problems(values: Mapping[str, Any]) -> List[str]:
    """The config problems found by building the cheap components and looking at the files, for
    ``validate_config(..., component_checks=component_problems)``.

    Checks (each only for the keys present in ``values``: ``validate_config`` leaves out those
    with problems of their own):

    - ``loss`` and ``optimizer`` (on a throwaway 1-element parameter) are built: a ``ValueError``
      they raise (``SimPOLoss: beta must be > 0``) names ``loss.<arg>``;
    - ``dataset`` / ``eval_dataset`` (a block or a list of blocks): missing or unreadable local
      ``data_files``, a folder without files of the source's kind, a ``split`` the local files do
      not have (:func:`prefopt.data.data_files_problems`); a ``max_seq_len`` larger than the
      model's (the model built on the meta device);
    - ``tokenizer``: a ``path`` / ``*_path`` / ``*_file`` argument naming no file.

    Args:
        values (Mapping[str, Any]): ``{key: value}`` as validated; component blocks as
            ``DictConfig``/``ListConfig``.

    Returns:
        List[str]: one message per problem, each starting with the config key it is about.
    """
    problems: List[str] = []
    if values.get("loss") is not None:
        problems += instantiation_problems("loss", values["loss"])
    if values.get("optimizer") is not None:
        problems += instantiation_problems("optimizer", values["optimizer"], [torch.nn.Parameter(torch.zeros(1))])
    tok = values.get("tokenizer")
    if isinstance(tok, DictConfig):
        for k in tok:
            k = str(k)
            if k == "path" or k.endswith(("_path", "_file")):
                p = _resolved(tok, k)
                if isinstance(p, str) and "://" not in p and not Path(p).exists():
                    problems.append(f"tokenizer.{k}: {p} does not exist")
    model_len, model_given = None, False
    datasets = [(k, values[k]) for k in DATASET_KEYS if values.get(k) is not None]
    if datasets and isinstance(values.get("model"), DictConfig):
        model_len = model_max_seq_len(values["model"])
        model_given = "max_seq_len" in values["model"]
    for key, value in datasets:
        for where, block in _blocks(key, value):
            try:
                plain = OmegaConf.to_container(block, resolve=True) if isinstance(block, DictConfig) else block
            except Exception:  # noqa: BLE001 - an unresolvable interpolation: the builder reports it
                continue
            if isinstance(plain, dict):
                problems += _dataset_problems(where, plain, model_len, model_given)
    return [p for p in problems if p]


def _resolved(block: DictConfig, key: str) -> Any:
    try:
        return block[key]
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: the component reports it
        return None


def zero_lr_warning(
    optimizer_cfg: Any, scheduler_cfg: Optional[Any], num_training_steps: int, *, max_steps: int = 100_000
) -> Optional[str]:
    """A warning if the learning rate is 0 at every optimizer step of the run (``optimizer.lr=0``,
    or a schedule that keeps it there), else None: such a run trains for hours and changes no
    weight. A warmup from 0 is fine (the rate is > 0 from its second step on).

    The schedule is replayed on a throwaway optimizer of one 1-element parameter, built as the
    recipes build theirs (``instantiate(scheduler_cfg, optimizer, num_training_steps=...,
    last_epoch=-1)``), step by step until a rate is > 0: at most ``min(num_training_steps,
    max_steps)`` scheduler steps (cheap: no optimizer step, no model).

    Raises:
        Whatever building the optimizer or the schedule raises (the recipe has just built both
        from the same config).
    """
    opt = config.instantiate(optimizer_cfg, [torch.nn.Parameter(torch.zeros(1))])

    def moving() -> bool:
        return any(float(g["lr"]) > 0 for g in opt.param_groups)

    if scheduler_cfg is None:
        if moving():
            return None
        return (
            f"optimizer.lr={optimizer_cfg.get('lr')}: the learning rate is 0 for the whole run (no lr_scheduler), so "
            "training will change no weight. Set optimizer.lr > 0 (e.g. optimizer.lr=1e-6)."
        )
    steps = min(num_training_steps, max_steps)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        sched = config.instantiate(scheduler_cfg, opt, num_training_steps=num_training_steps, last_epoch=-1)
        for _ in range(steps):
            if moving():
                return None
            sched.step()
    span = f"all {num_training_steps:,} optimizer steps" if steps == num_training_steps else f"the first {steps:,} optimizer steps"
    lr = optimizer_cfg.get("lr")
    return (
        f"the learning rate is 0 at {span} of the run (optimizer.lr={lr}, lr_scheduler "
        f"{scheduler_cfg.get('_component_')}), so training will change no weight. "
        + ("Set optimizer.lr > 0 (e.g. optimizer.lr=1e-6)." if lr == 0 else "Change lr_scheduler.")
    )
