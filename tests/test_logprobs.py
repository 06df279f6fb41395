"""Tier 1: per-sequence log-probs equal the naive log_softmax-gather reference."""

import pytest
import torch
from torch.testing import assert_close

from prefopt.logprobs import sequence_logps


def naive(logits, labels, average=True):
    # princeton / TRL get_batch_logps
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    mask = labels != -100
    labels[~mask] = 0
    tok = torch.log_softmax(logits.float(), -1).gather(2, labels.unsqueeze(2)).squeeze(2)
    s = (tok * mask).sum(-1)
    return s / mask.sum(-1) if average else s


def batch(b=4, s=13, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, v, generator=g) * 3
    labels = torch.randint(0, v, (b, s), generator=g)
    for i in range(b):  # varied prompt lengths and right padding
        labels[i, : 2 + i] = -100
        labels[i, s - i :] = -100
    return logits, labels


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("chunks", [1, 3, 5])
def test_equals_naive_reference_with_gradients(average, chunks):
    logits, labels = batch()
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = sequence_logps(list(a.chunk(chunks, dim=1)), labels, average=average).logps
    ref = naive(b, labels, average)
    assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    w = torch.randn(ours.shape)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


def test_hand_worked_eight_token_reward():
    # simpo_explained_with_trl: token probabilities 0.7 0.8 0.9 0.6 0.5 0.9 0.8 0.7, beta = 2
    # -> reward 2/8 * sum(log p) = -0.6436. Two-token vocab: logits [log p, log(1-p)].
    probs = torch.tensor([0.7, 0.8, 0.9, 0.6, 0.5, 0.9, 0.8, 0.7])
    logits = torch.zeros(1, 9, 2)
    logits[0, :8, 0] = probs.log()
    logits[0, :8, 1] = (1 - probs).log()
    labels = torch.full((1, 9), -100)
    labels[0, 1:] = 0  # token 0 at positions 1..8, predicted by positions 0..7
    out = sequence_logps(logits, labels)
    assert out.num_tokens.item() == 8
    assert_close(out.logps * 2.0, torch.tensor([-0.6436]), atol=1e-4, rtol=0)
    assert_close(sequence_logps(logits, labels, average=False).logps, torch.tensor([-2.5743]), atol=1e-4, rtol=0)


def test_no_float32_copy_of_whole_logits_saved_for_backward():
    b, s, v = 2, 16, 512
    logits = (torch.randn(b, s, v) * 2).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (b, s))
    labels[:, :3] = -100
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append((x.dtype, x.numel())) or x, lambda x: x):
        out = sequence_logps(list(logits.chunk(4, dim=1)), labels)
    assert out.logps.dtype == torch.float32
    big_fp32 = [n for dt, n in saved if dt == torch.float32 and n >= b * (s // 4) * v]
    assert big_fp32 == [], f"float32 logits-sized tensors saved for backward: {big_fp32}"
    out.logps.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    ref = logits.detach().float().requires_grad_()
    naive(ref, labels).sum().backward()
    assert_close(logits.grad.float(), ref.grad, atol=2e-3, rtol=2e-2)


def test_torchtune_chunked_model_output_matches_unchunked():
    from torchtune.models.llama2 import llama2

    torch.manual_seed(0)
    model = llama2(vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=32, max_seq_len=32)
    tokens = torch.randint(0, 64, (3, 12))
    labels = tokens.clone()
    labels[:, :4] = -100
    full = sequence_logps(model(tokens), labels).logps
    model.set_num_output_chunks(4)
    chunked = model(tokens)
    assert isinstance(chunked, list) and len(chunked) == 4
    assert_close(sequence_logps(chunked, labels).logps, full, atol=1e-6, rtol=1e-6)


def test_logits_mean_is_trls_statistic():
    logits, labels = batch()
    out = sequence_logps(list(logits.chunk(3, dim=1)), labels)
    assert_close(out.logits_mean, logits.mean(dim=(1, 2)))


def test_row_without_response_tokens_names_the_row():
    logits, labels = batch()
    labels[2, :] = -100
    labels[3, 1:] = -100  # only position 0 labelled: nothing predicts it after the shift
    with pytest.raises(ValueError, match=r"rows \[2, 3\]"):
        sequence_logps(logits, labels)


def test_shape_mismatch_raises():
    logits, labels = batch()
    with pytest.raises(ValueError, match="do not match labels"):
        sequence_logps([logits[:, :5]], labels)


# ------------------------------------------------------------------------------------------------
# model_sequence_logps: response positions only, output layer fused with the log-softmax.


def _tiny(kind: str):
    from torchtune.models.llama2 import llama2, lora_llama2
    from torchtune.models.qwen2 import qwen2

    torch.manual_seed(0)
    shape = dict(vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=32, max_seq_len=32)
    if kind == "linear":  # nn.Linear output: the fused path
        return llama2(**shape)
    if kind == "tied":  # TiedLinear output (qwen2.5 0.5B-3B, llama3.2): the fused path
        return qwen2(**shape, intermediate_dim=64, tie_word_embeddings=True)
    if kind == "gemma2":  # TiedLinear, and a final norm that soft-caps: unembed must keep model.norm
        from torchtune.models.gemma2 import gemma2

        return gemma2(**shape, head_dim=16, intermediate_dim=64, final_capping_value=1.0)
    # LoRA on the output layer: the module path (chunks of the scored positions through model.output)
    model = lora_llama2(["q_proj", "v_proj"], apply_lora_to_output=True, lora_rank=4, lora_alpha=8, **shape)
    for name, p in model.named_parameters():
        if "lora_b" in name:  # zero-initialised: make the LoRA path contribute
            torch.nn.init.normal_(p)
    return model


@pytest.mark.parametrize("kind", ["linear", "tied", "gemma2", "lora_output"])
@pytest.mark.parametrize("average", [True, False])
def test_model_sequence_logps_equals_whole_logits_path_with_gradients(kind, average):
    from prefopt.logprobs import model_sequence_logps

    model = _tiny(kind)
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = tokens.clone()
    labels[:, :4] = -100
    labels[1, 9:] = -100  # right padding on one row
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # a different upstream gradient per row

    ref = sequence_logps(model(tokens), labels, average=average)
    (ref.logps * weights).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    out = model_sequence_logps(model, tokens, labels, num_chunks=3, average=average)
    (out.logps * weights).sum().backward()
    assert_close(out.logps, ref.logps, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.num_tokens, ref.num_tokens)
    assert_close(out.logits_mean, ref.logits_mean, atol=1e-6, rtol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 5
    for name, g in grads.items():
        assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # The replaced unembed is gone again: the model's own forward returns logits.
    assert "unembed" not in vars(model)
    assert model(tokens).shape == (4, 12, 64)


def test_linear_token_logps_bf16_close_to_float32_and_keeps_no_logits():
    from prefopt.logprobs import linear_token_logps

    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g)
    w = torch.randn(300, 16, generator=g) * 0.3
    t = torch.randint(0, 300, (40,), generator=g)
    ref = torch.log_softmax(h @ w.t(), -1).gather(-1, t[:, None]).squeeze(-1)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        out = linear_token_logps(hb, wb, t, num_chunks=4)
    assert out.dtype == torch.float32
    assert_close(out, ref, atol=0.1, rtol=0.02)
    # Saved for backward: h [40, 16], W [300, 16], targets, lse [40]; nothing of size N x V.
    assert len(saved) >= 3 and all(s.numel() < 40 * 300 for s in saved), saved
    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    torch.log_softmax(hf @ wf.t(), -1).gather(-1, t[:, None]).sum().backward()
    out.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    assert_close(wb.grad.float(), wf.grad, atol=0.05, rtol=0.05)
    assert_close(hb.grad.float(), hf.grad, atol=0.05, rtol=0.05)


def test_model_sequence_logps_names_rows_without_response_tokens():
    from prefopt.logprobs import model_sequence_logps

    model = _tiny("linear")
    tokens = torch.randint(0, 64, (2, 8))
    labels = tokens.clone()
    labels[1, :] = -100
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        model_sequence_logps(model, tokens, labels)
    with pytest.raises(ValueError, match="must both be"):
        model_sequence_logps(model, tokens, labels[:, :5])
