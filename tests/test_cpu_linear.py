"""prefopt.cpu_linear.packed_linears: which layers it packs, that the packed product is the
layer's own (to float rounding), that it is really the packed copy that runs, and that
everything is as before once the block ends."""

import os

import pytest
import torch
from torch import nn
from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.models.llama3_2 import llama3_2
from torchtune.modules.peft import LoRALinear
from torchtune.modules.tied_linear import TiedLinear

from prefopt.cpu_linear import onednn_available, packed_linears
from prefopt.generation import generate_batch

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")

TINY = dict(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64)


def _model(builder=llama2, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    m = builder(**TINY, **kw) if builder is not llama3_2 else builder(**TINY, intermediate_dim=128, tie_word_embeddings=True)
    return m.to(dtype).eval()


def _tokens():
    return torch.randint(0, TINY["vocab_size"], (3, 11), generator=torch.Generator().manual_seed(1))


def _patched(model):
    return [m for m in model.modules() if "forward" in m.__dict__]


@torch.inference_mode()
def test_every_plain_linear_is_packed_and_computes_the_same_product():
    model = _model(intermediate_dim=128)
    tokens = _tokens()
    before = model(tokens)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert len(linears) == 2 * 7 + 1  # q, k, v, output_proj, w1, w2, w3 per layer; the output layer
    with packed_linears(model) as n:
        assert n == len(linears)
        assert set(map(id, _patched(model))) == set(map(id, linears))
        inside = model(tokens)
    torch.testing.assert_close(inside, before, rtol=1e-5, atol=1e-5)
    assert _patched(model) == []
    assert torch.equal(model(tokens), before)  # the layers' own forward is back, bit for bit


@torch.inference_mode()
def test_it_is_the_packed_copy_that_runs():
    # a weight changed inside the block is not seen: the product runs on the copy packed at entry
    model = _model(intermediate_dim=128)
    tokens = _tokens()
    before = model(tokens)
    with packed_linears(model):
        model.output.weight.mul_(2.0)
        stale = model(tokens)
        model.output.weight.div_(2.0)
    torch.testing.assert_close(stale, before, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model.output.weight.mul_(2.0)
    torch.testing.assert_close(model(tokens), 2 * before, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_lora_layers_are_left_and_a_tied_output_is_packed():
    lora = _model(lora_llama2, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=False, lora_rank=4,
                  lora_alpha=8, intermediate_dim=128)
    for m in lora.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_b.weight)  # B = 0 would hide a layer that dropped its adapter
    tokens = _tokens()
    before = lora(tokens)
    with packed_linears(lora) as n:
        lora_layers = [m for m in lora.modules() if isinstance(m, LoRALinear)]
        assert len(lora_layers) == 4 and not any("forward" in m.__dict__ for m in lora_layers)
        # k, output_proj, w1..w3 per layer, the output; and the adapters' own A and B (plain Linears)
        assert n == 2 * 5 + 1 + 2 * len(lora_layers)
        torch.testing.assert_close(lora(tokens), before, rtol=1e-5, atol=1e-5)

    tied = _model(llama3_2)
    assert isinstance(tied.output, TiedLinear)
    before = tied(tokens)
    with packed_linears(tied) as n:
        assert n == 2 * 7 + 1 and "forward" in tied.output.linear.__dict__
        torch.testing.assert_close(tied(tokens), before, rtol=1e-5, atol=1e-5)
    assert "forward" not in tied.output.linear.__dict__


def test_with_gradients_on_the_layers_own_product_gives_the_gradients():
    model = _model(intermediate_dim=128).train()
    tokens = _tokens()
    model(tokens).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with packed_linears(model) as n:
        assert n > 0
        model(tokens).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-6, atol=1e-7, msg=name)


@torch.inference_mode()
def test_blocks_nest_and_can_be_turned_off():
    model = _model(intermediate_dim=128)
    with packed_linears(model) as outer:
        patched = _patched(model)
        with packed_linears(model) as inner:
            assert inner == 0
        assert _patched(model) == patched  # the inner block's end leaves the outer's packing
    assert _patched(model) == []
    with packed_linears(model, enabled=False) as n:
        assert n == 0 and _patched(model) == []
    with torch.backends.mkldnn.flags(enabled=False), packed_linears(model) as n:
        assert n == 0
    assert outer == 2 * 7 + 1


@torch.inference_mode()
def test_bfloat16_and_a_wrong_input_dtype():
    model = _model(dtype=torch.bfloat16, intermediate_dim=128)
    tokens = _tokens()
    before = model(tokens).float()
    with packed_linears(model) as n:
        assert n == 2 * 7 + 1
        torch.testing.assert_close(model(tokens).float(), before, rtol=2e-2, atol=5e-2)
        with pytest.raises(RuntimeError, match="packed_linears: a torch.float32 input on cpu reached a layer packed for torch.bfloat16"):
            model.output(torch.zeros(2, TINY["embed_dim"]))


def test_generation_packs_and_decodes_the_tokens_it_decodes_without():
    model = _model(intermediate_dim=128)
    prompts = [[1, 5, 9, 4], [1, 7], [1, 7], [1, 3, 3, 8, 2, 6]]
    kw = dict(seeds=[0, 1, 2, 3], max_new_tokens=12, temperature=0.0)
    calls = []
    orig = torch.ops.mkldnn._linear_pointwise

    class Spy:  # counts the packed products generate_batch runs
        def __call__(self, *a):
            calls.append(a[0].shape[0])
            return orig(*a)

    with torch.backends.mkldnn.flags(enabled=False):
        plain = generate_batch(model, prompts, **kw)
    torch.ops.mkldnn._linear_pointwise = Spy()
    try:
        packed = generate_batch(model, prompts, **kw)
    finally:
        torch.ops.mkldnn._linear_pointwise = orig
    assert [g.tokens for g in packed] == [g.tokens for g in plain]
    assert len(calls) >= 12 * (2 * 7 + 1)  # every decode step's 15 products ran packed
    assert _patched(model) == []


@torch.inference_mode()
def test_copies_that_would_not_fit_are_not_made(monkeypatch, caplog):
    """The packed copies take as much memory as the weights: over half of what is available, the
    layers run unpacked (the same numbers as without the block) and a warning says why."""
    import prefopt.cpu_linear as cl

    model = _model(intermediate_dim=128)
    weights = sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear)
    tokens = _tokens()
    before = model(tokens)
    monkeypatch.setattr(cl, "available_memory_bytes", lambda: 2 * weights)  # exactly half: packs
    with packed_linears(model) as n:
        assert n == 15
    monkeypatch.setattr(cl, "available_memory_bytes", lambda: 2 * weights - 1)
    with caplog.at_level("WARNING", logger="prefopt.cpu_linear"), packed_linears(model) as n:
        assert n == 0 and _patched(model) == []
        assert torch.equal(model(tokens), before)
    assert "not packing 15 linear layers" in caplog.text and "available" in caplog.text
    monkeypatch.setattr(cl, "available_memory_bytes", lambda: None)  # unknown: packs
    with packed_linears(model) as n:
        assert n == 15


def test_available_memory_is_read_from_the_system():
    from prefopt.cpu_linear import available_memory_bytes

    got = available_memory_bytes()
    meminfo = open("/proc/meminfo").read() if os.path.exists("/proc/meminfo") else ""
    if "MemAvailable:" not in meminfo:
        pytest.skip("no /proc/meminfo here")
    kib = int(meminfo.split("MemAvailable:")[1].split()[0])
    # at most the system's figure (a cgroup may lower it), and a real amount (over 64 MiB)
    assert 64 * 2**20 < got <= kib * 1024 * 1.05
