"""The benchmarks' Hugging Face Llama (seeded, random init): its shapes, and the script that writes it.

    python benchmarks/_make_model.py OUT_DIR SEED 'JSON of one of SHAPES'

The launchers (peers_benchmark.py, packing_benchmark.py) call :func:`make_model`, which runs this
file as a separate process, so that they never import torch: a child process inherits its
parent's peak RSS (ru_maxrss survives fork + exec on Linux), so the process that launches the
measured runs must stay small. This module imports torch only in :func:`main`.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    # the first benchmark's model: the output layer (vocab 32000 x hidden 256) is most of the step
    "small": dict(vocab_size=32000, num_layers=4, num_heads=4, num_kv_heads=4, embed_dim=256, intermediate_dim=688, max_seq_len=1024, norm_eps=1e-5),
    # the packing benchmark's model (~134M parameters, 85M of them in the decoder layers): the
    # layers, which the packed layout saves work in, are most of the step. max_seq_len 2048: a
    # packed row is as long as the longest pair (prompt + chosen + rejected) of its batch.
    "decoder": dict(vocab_size=32000, num_layers=12, num_heads=12, num_kv_heads=12, embed_dim=768, intermediate_dim=2048, max_seq_len=2048, norm_eps=1e-5),
}
LORA = dict(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=False, apply_lora_to_output=False, lora_rank=8, lora_alpha=16, lora_dropout=0.0)
HF_LORA_TARGETS = "q_proj,v_proj"


def make_model(wd: Path, shape_name: str, seed: int) -> Path:
    """The HF Llama of SHAPES[shape_name] under ``wd``, seeded; reused if the spec is unchanged.
    The small shape keeps the folder name it always had (model/)."""
    shape = SHAPES[shape_name]
    model_dir = wd / ("model" if shape_name == "small" else f"model_{shape_name}")
    spec = {"shape": shape, "seed": seed, "v": 1}
    spec_file = model_dir.with_name(model_dir.name + "_spec.json")
    if not (spec_file.exists() and json.loads(spec_file.read_text()) == spec and (model_dir / "model.safetensors").exists()):
        shutil.rmtree(model_dir, ignore_errors=True)
        subprocess.run([sys.executable, str(Path(__file__).resolve()), str(model_dir), str(seed), json.dumps(shape)], check=True, cwd=REPO)
        spec_file.write_text(json.dumps(spec))
    return model_dir


def count_params(model_dir: Path) -> int:
    """Parameters in model.safetensors, from its JSON header (no torch in this process)."""
    with (model_dir / "model.safetensors").open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def shape_words(shape: Dict[str, Any]) -> str:
    return (f"vocab {shape['vocab_size']}, hidden {shape['embed_dim']}, {shape['num_layers']} layers, {shape['num_heads']} heads, "
            f"MLP {shape['intermediate_dim']}")


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from benchmarks.wordtok import BOS_ID, EOS_ID, PAD_ID

    out, seed, shape = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["embed_dim"],
        intermediate_size=shape["intermediate_dim"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=shape["max_seq_len"],
        rms_norm_eps=shape["norm_eps"],
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    if not (out / "model.safetensors").exists():
        raise SystemExit(f"save_pretrained did not write {out}/model.safetensors")


if __name__ == "__main__":
    main()
