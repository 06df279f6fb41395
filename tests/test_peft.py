"""bf16 LoRA at SimPO's learning rates: float32 adapter master weights keep every update."""

import torch
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from prefopt.collate import packed_collate_preference
from prefopt.loss import SimPOLoss
from prefopt.peft import keep_adapters_in_fp32
from prefopt.step import preference_forward

V = 256
LR = 1e-5  # the shipped bf16 LoRA configs' learning rate (1B LoRA, 8B QLoRA)


def _items(g, n=4):
    out = []
    for i in range(n):
        p, c, r = (torch.randint(1, V, (k,), generator=g).tolist() for k in (12, 9, 7))
        out.append({"chosen_input_ids": p + c, "chosen_labels": [-100] * 12 + c,
                    "rejected_input_ids": p + r, "rejected_labels": [-100] * 12 + r, "row": i})
    return out


def _train(dtype, fp32_adapters, steps=20):
    from torchtune.models.llama2 import lora_llama2
    from torchtune.training import set_default_dtype

    torch.manual_seed(0)
    with set_default_dtype(dtype):
        model = lora_llama2(["q_proj", "v_proj"], lora_rank=8, lora_alpha=16, vocab_size=V, num_layers=2,
                            num_heads=4, num_kv_heads=4, embed_dim=64, max_seq_len=64)
    if fp32_adapters:
        assert keep_adapters_in_fp32(model) == 8
    params = get_adapter_params(model)
    set_trainable_params(model, params)
    start = {k: p.detach().float().clone() for k, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)
    loss_fn = SimPOLoss(beta=2.0, gamma=0.5)
    batch = packed_collate_preference(_items(torch.Generator().manual_seed(1)), max_seq_len=64)
    losses = []
    for _ in range(steps):
        out = preference_forward(model, batch, loss_fn, device=torch.device("cpu"))
        loss = out.losses.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    moved = {k: (p.detach().float() != start[k]).float().mean().item() for k, p in params.items()}
    delta = torch.cat([(p.detach().float() - start[k]).flatten() for k, p in sorted(params.items())])
    return losses, moved, params, delta


def test_bf16_lora_keeps_every_update_and_tracks_fp32():
    ref, ref_moved, _, ref_delta = _train(torch.float32, fp32_adapters=False)
    bad, bad_moved, _, bad_delta = _train(torch.bfloat16, fp32_adapters=False)
    good, good_moved, params, good_delta = _train(torch.bfloat16, fp32_adapters=True)
    lora_a = lambda moved: min(v for k, v in moved.items() if "lora_a" in k)  # noqa: E731
    # the defect: adapters in bf16 lose most updates of lora_a (measured: ~2% of entries moved)
    assert lora_a(bad_moved) < 0.5, bad_moved
    # the fix: float32 masters, >= 99% of every adapter's entries move
    assert all(p.dtype == torch.float32 for p in params.values())
    assert min(good_moved.values()) >= 0.99, good_moved
    assert min(ref_moved.values()) >= 0.99
    # the update's direction follows the fp32 run's (Adam's per-entry steps still differ where
    # bf16 gradient rounding flips a tiny gradient's sign)
    cos = lambda d: torch.nn.functional.cosine_similarity(d, ref_delta, dim=0).item()  # noqa: E731
    print(f"\ncosine of the 20-step update with fp32's: fp32 adapters {cos(good_delta):.3f}, bf16 adapters {cos(bad_delta):.3f}")
    assert cos(good_delta) > 0.8
    # the loss curve tracks the fp32 run's: the same drop over the 20 steps (the bf16 base shifts
    # the level by ~0.01; at lr 1e-5 the drop is ~1e-3, bf16 loss noise ~5e-4)
    assert abs((good[0] - good[-1]) - (ref[0] - ref[-1])) < 5e-4, (ref, good)
    assert max(abs(a - b) for a, b in zip(ref, good)) < 0.02, (ref, good)
