"""CUDA-only paths (the ``gpu`` tier): skipped on a machine without a CUDA device, with the reason.

Run on a lent GPU by ``benchmarks/gpu_check.sh`` (``pytest -m gpu``). Tolerances are stated per
test: bf16 against an fp32 reference of the same model and batch.
"""

import pytest
import torch
from torch.testing import assert_close

pytestmark = pytest.mark.gpu

V = 512


def _cuda():
    return torch.device("cuda")


def _items(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, c, r = (int(x) for x in torch.randint(3, 40, (3,), generator=g))
        prompt = torch.randint(1, V, (p,), generator=g).tolist()
        ch, rj = (torch.randint(1, V, (k,), generator=g).tolist() for k in (c, r))
        out.append({"chosen_input_ids": prompt + ch, "chosen_labels": [-100] * p + ch,
                    "rejected_input_ids": prompt + rj, "rejected_labels": [-100] * p + rj, "row": i})
    return out


def _model(dtype=torch.float32, lora=False):
    from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
    from torchtune.training import set_default_dtype

    torch.manual_seed(0)
    shape = dict(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=128, max_seq_len=256,
                 intermediate_dim=256)
    with set_default_dtype(dtype), _cuda():
        if lora:
            return lora_llama3_2(["q_proj", "v_proj"], lora_rank=8, lora_alpha=16, **shape)
        return llama3_2(**shape)


def _step(model, batch, loss_fn=None):
    from prefopt.loss import SimPOLoss
    from prefopt.step import preference_forward

    model.zero_grad(set_to_none=True)
    out = preference_forward(model, batch, loss_fn or SimPOLoss(), device=_cuda(), num_chunks=4)
    out.losses.sum().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_bf16_fused_projection_close_to_fp32():
    """bf16 hidden/weight with the float32-out weight-gradient matmul: log-probs within 0.05,
    gradients within 2% of the fp32 computation (bf16 inputs: ~3 significant digits)."""
    from prefopt.logprobs import linear_token_logps

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(300, 128, device="cuda", generator=g)
    w = torch.randn(V, 128, device="cuda", generator=g) * 0.1
    t = torch.randint(0, V, (300,), device="cuda", generator=g)
    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = torch.log_softmax(hf @ wf.t(), -1).gather(-1, t[:, None]).squeeze(-1)
    ref.sum().backward()
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    out = linear_token_logps(hb, wb, t, num_chunks=5)
    out.sum().backward()
    assert_close(out, ref.detach(), atol=0.05, rtol=0.02)
    assert_close(wb.grad.float(), wf.grad, atol=0.02 * wf.grad.abs().max().item(), rtol=0.02)
    assert_close(hb.grad.float(), hf.grad, atol=0.02 * hf.grad.abs().max().item(), rtol=0.02)


def test_block_mask_packed_equals_padded():
    """FlexAttention BlockMask (the packed layout on CUDA) vs the padded layout, fp32: 1e-4."""
    from prefopt.collate import packed_collate_preference, padded_collate_preference

    model = _model()
    items = _items()
    ref, ref_grads = _step(model, padded_collate_preference(items))
    out, grads = _step(model, packed_collate_preference(items, row_len=128))
    assert_close(out.losses, ref.losses, atol=1e-4, rtol=1e-4)
    assert_close(out.chosen.logps, ref.chosen.logps, atol=1e-4, rtol=1e-4)
    for name, g in grads.items():
        assert_close(g, ref_grads[name], atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def _reward_scores(device, flex_attention=None):
    """A tiny one-output Llama scoring 3 prompts' responses (groups of 4, 1 and 3) with the
    prompts shared in rows, and each conversation alone (the padded layout, causal SDPA)."""
    from torchtune.models.llama2 import llama2_classifier

    from prefopt.reward import RewardModel

    torch.manual_seed(0)
    with torch.device(device):
        net = llama2_classifier(num_classes=1, vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2,
                                embed_dim=128, max_seq_len=512, intermediate_dim=256)
    rm = RewardModel(net, None, batch_size=5, device=torch.device(device), flex_attention=flex_attention)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (90, 5, 40)]
    keys = [0, 0, 0, 0, 1, 2, 2, 2]
    seqs = [prompts[k] + torch.randint(1, V, (int(n),), generator=g).tolist()
            for k, n in zip(keys, torch.randint(1, 120, (len(keys),), generator=g))]
    return rm, rm.score_ids(seqs, groups=keys), rm.score_ids(seqs)


@pytest.mark.parametrize("flex_attention", [None, False])
def test_reward_rows_score_as_alone(flex_attention):
    """On CUDA a reward model's rows of a prompt's responses go through FlexAttention with a
    BlockMask (reward.flex_attention's default there) or per-part SDPA (False); each response
    scores what it scores alone, fp32: 1e-4."""
    rm, shared, alone = _reward_scores("cuda", flex_attention)
    assert rm.flex_attention == (flex_attention is None)
    assert shared == pytest.approx(alone, abs=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_step_makes_no_host_sync(packed):
    """CUDA's sync debug mode raises on any synchronizing call inside the step's forward and
    backward (the batch is pinned, as the recipes' DataLoader pins it)."""
    from prefopt.collate import packed_collate_preference, padded_collate_preference

    model = _model(torch.bfloat16)
    batch = (packed_collate_preference if packed else padded_collate_preference)(_items())
    batch = {k: (v.pin_memory() if hasattr(v, "pin_memory") else type(v)(*(t.pin_memory() for t in v)))
             for k, v in batch.items()}
    _step(model, batch)  # warm-up: kernels, the BlockMask compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_lora_with_fp32_adapters_close_to_fp32():
    """bf16 base + float32 adapters: losses within 0.02 of the fp32 model's; adapter grads fp32."""
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from prefopt.collate import packed_collate_preference
    from prefopt.peft import keep_adapters_in_fp32

    batch = packed_collate_preference(_items())
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(dtype, lora=True)
        keep_adapters_in_fp32(model)
        params = get_adapter_params(model)
        set_trainable_params(model, params)
        out, grads = _step(model, batch)
        assert all(p.grad.dtype == torch.float32 for p in params.values())
        outs[dtype] = out.losses.float()
    assert_close(outs[torch.bfloat16], outs[torch.float32], atol=0.02, rtol=0.02)


def test_compile_equals_eager_on_cuda():
    """torch.compile per decoder layer (the recipes' compile) vs eager, fp32: 1e-4."""
    from torchtune import training

    from prefopt.collate import packed_collate_preference

    batch = packed_collate_preference(_items())
    eager, _ = _step(_model(), batch)
    model = _model()
    training.compile_model(model)
    compiled, _ = _step(model, batch)
    assert_close(compiled.losses, eager.losses, atol=1e-4, rtol=1e-4)


def test_activation_offloading_keeps_the_losses_and_gradients():
    """torchtune's activation offloading context around the step (the recipes' use), with the
    fused projection: the same losses and gradients as without it (fp32, 1e-5)."""
    from torchtune import modules, training

    from prefopt.collate import packed_collate_preference

    batch = packed_collate_preference(_items())
    ref, ref_grads = _step(_model(), batch)
    model = _model()
    training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    ctx = training.get_act_offloading_ctx_manager(model, True)
    with ctx:
        out, grads = _step(model, batch)
    assert_close(out.losses, ref.losses, atol=1e-5, rtol=1e-5)
    for name, g in ref_grads.items():
        key = next(k for k in grads if k.replace("._checkpoint_wrapped_module", "") == name)
        assert_close(grads[key], g, atol=1e-5, rtol=1e-4)
