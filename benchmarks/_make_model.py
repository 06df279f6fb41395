"""Write the benchmark's Hugging Face Llama (seeded, random init) to a folder.

    python benchmarks/_make_model.py OUT_DIR SEED 'JSON of one of run_benchmark.SHAPES'

A separate process so that run_benchmark.py itself never imports torch: a child process inherits
its parent's peak RSS (ru_maxrss survives fork + exec on Linux), so the process that launches the
measured runs must stay small.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.wordtok import BOS_ID, EOS_ID, PAD_ID  # noqa: E402


def main() -> None:
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
