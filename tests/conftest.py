import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "prefopt" / "assets" / "tiny"

# Tests never reach a hub: everything they use ships with the repo or is made in tmp_path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# ...and never write tokenized data, or datasets' copies of loaded files, into the user's caches
# (tune_run's subprocesses and pytest-xdist's workers inherit the variables; the process that
# made the folders removes them at exit). datasets reads HF_DATASETS_CACHE when it is imported.
for _var, _prefix in (("PREFOPT_CACHE_DIR", "prefopt-test-cache-"), ("HF_DATASETS_CACHE", "prefopt-test-hf-")):
    if _var not in os.environ:
        import atexit
        import shutil
        import tempfile

        os.environ[_var] = tempfile.mkdtemp(prefix=_prefix)
        atexit.register(shutil.rmtree, os.environ[_var], True)


# Test tiers: every test is in exactly one. ``unit`` (math, unit, in-process) is every test not
# marked with another; ``slow``: end-to-end `tune run` subprocesses; ``peer``: parity with TRL /
# transformers / princeton; ``gpu``: CUDA-only paths, skipped on a machine without CUDA.
TIERS = ("gpu", "peer", "slow")


# Under pytest-xdist (`pytest -n 2`, what CI runs) every worker is one of several processes on
# the machine's cores: one thread each, for the tests run in-process and, through tune_env, for
# the single-process `tune run`s they start (2-process runs already use one thread per rank).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"


def _tier(keywords) -> str:
    return next((t for t in TIERS if t in keywords), "unit")


def pytest_collection_modifyitems(config, items):
    import torch

    skip = pytest.mark.skip(reason="needs a CUDA device (the gpu tier; benchmarks/gpu_check.sh runs it)")
    for item in items:
        tier = _tier(item.keywords)
        if tier == "unit":
            item.add_marker(pytest.mark.unit)
        if tier == "gpu" and not torch.cuda.is_available():
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """One line per tier: what CI ran of each (.ci/run runs every CPU tier)."""
    from collections import Counter

    counts = {t: Counter() for t in ("unit", *TIERS[::-1])}
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            keywords = getattr(rep, "keywords", None)  # a report's keywords also come back from xdist workers
            if keywords is None:
                continue
            tier = _tier(keywords)
            if outcome != "passed" or getattr(rep, "when", "call") == "call":
                counts[tier][outcome] += 1
    terminalreporter.section("tests per tier")
    for tier, c in counts.items():
        terminalreporter.write_line(f"{tier:>5}: " + ", ".join(f"{c[o]} {o}" for o in ("passed", "failed", "skipped", "error") if c[o]) if c else f"{tier:>5}: none run")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from torchtune.models.llama2 import llama2_tokenizer

    return llama2_tokenizer(str(TINY / "tokenizer.model"), max_seq_len=None, prompt_template=None)


def load_recipe(name: str):
    """This repo's ``recipes/<name>.py`` as a module, loaded by path (what `tune run` runs, never
    a ``recipes`` package elsewhere on sys.path), for tests that build the recipe classes in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tune_bin() -> str:
    return str(Path(sys.executable).with_name("tune"))


def read_log(output_dir) -> dict:
    """{step: {metric: value}} from the DiskLogger file(s) under <output_dir>/logs."""
    from prefopt.logs import read_disk_log

    return read_disk_log(Path(output_dir) / "logs")


def complete_steps(output_dir) -> list:
    """Steps N of the complete resume states under <output_dir>/checkpoints, oldest first."""
    from prefopt.resume import complete_states

    return [int(p.name.split("_")[1]) for p in complete_states(Path(output_dir) / "checkpoints")]


def tune_command(recipe: str, config: str, *overrides: str, nproc: int = 0) -> list:
    """The `tune run` command line: with ``nproc``, torchrun's --standalone (a free rendezvous
    port, so parallel test sessions do not collide on 29500) and --nproc_per_node."""
    cmd = [tune_bin(), "run"]
    if nproc:
        cmd += ["--standalone", "--nproc_per_node", str(nproc)]
    return cmd + [recipe, "--config", config, *overrides]


def tune_env(nproc: int = 0, **extra: str) -> dict:
    # PASSIVE: OpenMP threads sleep instead of spinning when they wait; with any other process on
    # the 2 cores, spinning threads made steps ~10x slower. Several processes: one thread each.
    threads = "1" if nproc else os.environ.get("OMP_NUM_THREADS", "2")
    return {**os.environ, "OMP_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE",
            "TORCHINDUCTOR_COMPILE_THREADS": "1", **extra}


def tune_run(recipe: str, config: str, *overrides: str, nproc: int = 0, timeout: int = 600, check: bool = True,
             prefix: tuple = ()):
    """`tune run` from the repo root, as the README shows it (the tests' one subprocess runner);
    ``prefix`` goes in front of the command (e.g. a private mount namespace). Returns the
    CompletedProcess; with ``check`` a failure raises with the output's tails."""
    import subprocess

    cmd = [*prefix, *tune_command(recipe, config, *overrides, nproc=nproc)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=tune_env(nproc))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


# Collectives in the in-process 2-rank tests time out after this instead of torch's 30 minutes (the
# tiny models' steps take well under a second, several under load).
GLOO_TIMEOUT_S = 120


def init_gloo(rank: int, world: int, init: str) -> None:
    """In a worker of :func:`spawn_gloo`: joins the gloo group at ``init`` (a ``file://`` store,
    so there is no free port to race other tests for), with collectives that time out after
    GLOO_TIMEOUT_S. A worker still running 10 s before that prints every thread's stack to
    stderr (``watchdog`` restarts the clock), so that a hang shows where each rank waits."""
    from datetime import timedelta

    import torch.distributed as dist

    watchdog()
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=GLOO_TIMEOUT_S))


def watchdog() -> None:
    """(Re)starts the clock after which a spawned worker prints its threads' stacks (not fatal)."""
    import faulthandler

    faulthandler.dump_traceback_later(GLOO_TIMEOUT_S - 10, exit=False)


def spawn_gloo(worker, tmp_dir, *args, nprocs: int = 2):
    """``torch.multiprocessing.spawn(worker, (init, *args))`` with ``init`` a fresh ``file://``
    store in ``tmp_dir`` (the worker calls :func:`init_gloo` with it). Run once more if a
    collective timed out: a gloo transport stall (one rank waiting on a send the other never
    received, 30 minutes, seen once in CI, 2026-12-03, not reproduced in 22 runs under load) is
    not what these tests test; any other failure, or a second timeout, is raised."""
    import warnings

    import torch.multiprocessing as mp

    for attempt in (0, 1):
        init = f"file://{Path(tmp_dir) / f'gloo_store_{attempt}'}"
        try:
            mp.spawn(worker, args=(init, *args), nprocs=nprocs, join=True)
            return
        except mp.ProcessRaisedException as e:
            if attempt or "Timed out" not in str(e):
                raise
            warnings.warn(f"a gloo collective timed out; running the {nprocs} processes once more:\n{e}")


def apply_peft_adapter(state_dict: dict, adapter_dir) -> dict:
    """``state_dict`` (a Hugging Face model's) with the PEFT LoRA adapter in ``adapter_dir``
    (``adapter_model.safetensors`` + ``adapter_config.json``) merged as PEFT merges it:
    W + B @ A * lora_alpha / r. What ``PeftModel.from_pretrained(...).merge_and_unload()``
    gives, by hand: the tests check both (:func:`peft_merged` loads with PEFT itself)."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    adapter = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    scale = cfg["lora_alpha"] / cfg["r"]
    out = dict(state_dict)
    for key, a in adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        base = key[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        out[base] = out[base] + (b.double() @ a.double() * scale).to(out[base].dtype)
    return out


def recording_compile():
    """A stand-in for ``torch.compile`` (a real compile takes minutes on 2 CPU cores; the gpu tier
    compiles for real): ``(fake, compiled, steps)``; ``fake(model)`` records ``model`` in
    ``compiled`` and returns a step that records each call's cache length (the mask's last
    dimension) in ``steps`` and runs the model."""
    compiled, steps = [], []

    def fake(model):
        compiled.append(model)
        return lambda tokens, **kw: steps.append(kw["mask"].shape[-1]) or model(tokens, **kw)

    return fake, compiled, steps


def peft_merged(model, adapter_dir):
    """``model`` (a transformers model) with the LoRA adapter in ``adapter_dir`` loaded and merged
    by PEFT itself (``PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()``).

    PEFT's torchao dispatcher raises for the torchao 0.13 installed here (it wants > 0.16) on every
    LoRA layer, even a plain ``nn.Linear``'s; it is told torchao is absent, which changes nothing
    for these adapters (no layer holds a torchao tensor)."""
    from unittest import mock

    peft = pytest.importorskip("peft")
    import peft.tuners.lora.torchao as lora_torchao

    with mock.patch.object(lora_torchao, "is_torchao_available", lambda: False):
        return peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def next_token_logps(logits, tokens):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) per position, from a causal LM's logits."""
    import torch

    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
