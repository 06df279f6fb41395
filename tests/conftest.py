import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "prefopt" / "assets" / "tiny"

# Tests never reach a hub: everything they use ships with the repo or is made in tmp_path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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
