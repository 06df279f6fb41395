import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "prefopt" / "assets" / "tiny"

# Tests never reach a hub: everything they use ships with the repo or is made in tmp_path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# ...and never write tokenized data into the user's cache (tune_run's subprocesses inherit it).
if "PREFOPT_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["PREFOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="prefopt-test-cache-")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from torchtune.models.llama2 import llama2_tokenizer

    return llama2_tokenizer(str(TINY / "tokenizer.model"), max_seq_len=None, prompt_template=None)


def tune_bin() -> str:
    return str(Path(sys.executable).with_name("tune"))


def read_log(output_dir) -> dict:
    """{step: {metric: value}} from the DiskLogger file(s) under <output_dir>/logs."""
    from prefopt.logs import read_disk_log

    return read_disk_log(Path(output_dir) / "logs")


def complete_steps(output_dir) -> list:
    """Steps N of the complete resume states under <output_dir>/checkpoints, oldest first."""
    from prefopt.checkpointing import complete_states

    return [int(p.name.split("_")[1]) for p in complete_states(Path(output_dir) / "checkpoints")]


def tune_run(recipe: str, config: str, *overrides: str, nproc: int = 0, timeout: int = 600, check: bool = True):
    """`tune run` from the repo root, as the README shows it; returns the CompletedProcess."""
    import subprocess

    cmd = [tune_bin(), "run"]
    if nproc:
        cmd += ["--nproc_per_node", str(nproc)]
    cmd += [recipe, "--config", config, *overrides]
    # PASSIVE: OpenMP threads sleep instead of spinning when they wait; with any other process on
    # the 2 cores, spinning threads made steps ~10x slower.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
