"""One packed LoRA step (forward + backward) of the 134M decoder shape on the CPU: the attention
under the packed layout's dense mask vs per-part SDPA (prefopt.attention.SharedPrefixRows, the
CPU's default), alternating, 3 rounds after one warm-up each (a benchmark, not a test).

    python benchmarks/packed_attention_step.py P R B   # e.g. 300 350 4

B pairs of random token ids, a prompt of ~P and responses of ~R tokens (each x U(0.6, 1.4)), laid
out by the recipes' packed collate (max_seq_len 4096: one row since 2026-12-04, two before); LoRA r8 on q_proj/v_proj.
The dense path is the step with prefopt.step's structure reader swapped for the dense mask.
Prints the rows, each step's seconds and the median ratio."""
import random
import sys
import time

import torch

sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))
from torchtune.models.llama2 import lora_llama2
from torchtune.modules.peft import get_adapter_params, set_trainable_params

import prefopt.step as st
from prefopt.collate import packed_collate_preference
from prefopt.loss import SimPOLoss
from prefopt.packing import packed_attention_mask
from prefopt.step import preference_forward

P, R, B = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = lora_llama2(["q_proj", "v_proj"], lora_rank=8, lora_alpha=16, vocab_size=32000, num_layers=12, num_heads=12,
                    num_kv_heads=12, embed_dim=768, intermediate_dim=2048, max_seq_len=4096)
set_trainable_params(model, get_adapter_params(model))
rng = random.Random(0)
items = []
for i in range(B):
    p = [rng.randrange(3, 32000) for _ in range(int(P * rng.uniform(0.6, 1.4)))]
    c = [rng.randrange(3, 32000) for _ in range(int(R * rng.uniform(0.6, 1.4)))]
    r = [rng.randrange(3, 32000) for _ in range(int(R * rng.uniform(0.6, 1.4)))]
    items.append({"chosen_input_ids": p + c, "chosen_labels": [-100] * len(p) + c,
                  "rejected_input_ids": p + r, "rejected_labels": [-100] * len(p) + r, "row": i})
batch = packed_collate_preference(items, max_seq_len=4096)
print("rows x len", tuple(batch["tokens"].shape), "tokens", sum(len(x["chosen_input_ids"]) + len(x["rejected_input_ids"]) for x in items))
orig_rows = st.shared_prefix_rows
def step(mode):
    if mode == "dense":
        st.shared_prefix_rows = lambda p, k: packed_attention_mask(p, k, block_mask=False)
    else:
        st.shared_prefix_rows = orig_rows
    t = time.perf_counter()
    out = preference_forward(model, batch, SimPOLoss(), device=torch.device("cpu"))
    out.losses.sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t, out.losses.detach()
step("dense")
step("parts")
times = {"dense": [], "parts": []}
for _ in range(3):
    for mode in ("dense", "parts"):
        sec, losses = step(mode)
        times[mode].append(round(sec, 2))
print(times, "median ratio dense/parts %.2f" % (sorted(times["dense"])[1] / sorted(times["parts"])[1]))
