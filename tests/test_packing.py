"""The packed, prefix-shared layout equals the padded layout: log-probs, losses, rewards,
metrics and every gradient (fp32, 1e-5), on llama2/llama3/qwen2/mistral shapes."""


import pytest
import torch
from torch.testing import assert_close

from prefopt.collate import packed_collate_preference, padded_collate_preference
from prefopt.loss import SimPOLoss
from prefopt.packing import (
    CHOSEN,
    PAD,
    REJECTED,
    SHARED,
    packed_attention_mask,
    packing_unsupported_reason,
)
from prefopt.step import preference_forward

V = 96
IGN = -100


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "llama2":
        from torchtune.models.llama2 import llama2

        return llama2(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=128)
    if kind == "llama3":
        from torchtune.models.llama3 import llama3

        return llama3(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=128,
                      intermediate_dim=64)
    if kind == "llama3_2":  # scaled RoPE and a tied output layer
        from torchtune.models.llama3_2 import llama3_2

        return llama3_2(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=128,
                        intermediate_dim=64)
    if kind == "qwen2":  # q/k/v biases, tied output
        from torchtune.models.qwen2 import qwen2

        return qwen2(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=128,
                     intermediate_dim=64, tie_word_embeddings=True)
    if kind == "mistral":
        from torchtune.models.mistral import mistral

        return mistral(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=128,
                       intermediate_dim=64)
    if kind == "lora_output":  # LoRA on the output layer: the module path of the projection
        from torchtune.models.llama2 import lora_llama2

        m = lora_llama2(["q_proj", "v_proj"], apply_lora_to_output=True, lora_rank=4, lora_alpha=8, vocab_size=V,
                        num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=128)
        for name, p in m.named_parameters():
            if "lora_b" in name:
                torch.nn.init.normal_(p)
        return m
    raise ValueError(kind)


def _pair(g, prompt, chosen, rejected, shared_response=0, *, row):
    p = torch.randint(1, V, (prompt,), generator=g).tolist()
    c = torch.randint(1, V, (chosen,), generator=g).tolist()
    r = torch.randint(1, V, (rejected,), generator=g).tolist()
    r[:shared_response] = c[:shared_response]  # responses that start alike share more than the prompt
    if r == c:
        r[-1] = (r[-1] % (V - 1)) + 1
    return {
        "chosen_input_ids": p + c, "chosen_labels": [IGN] * prompt + c,
        "rejected_input_ids": p + r, "rejected_labels": [IGN] * prompt + r, "row": row,
    }


def _items(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [
        (5, 7, 3, 0),   # different response lengths
        (9, 1, 4, 0),   # a one-token chosen response
        (20, 2, 3, 0),  # a prompt longer than both responses
        (3, 6, 6, 2),   # responses sharing their first two tokens
        (4, 2, 5, 2),   # the chosen response is a prefix of the rejected one
        (1, 4, 1, 0),   # a one-token prompt, a one-token rejected response
    ]
    return [_pair(g, *s, row=10 + i) for i, s in enumerate(shapes)]


def _run(model, batch, loss_fn):
    model.zero_grad()
    out = preference_forward(model, batch, loss_fn, device=torch.device("cpu"), num_chunks=3)
    w = torch.linspace(-1.0, 2.0, out.losses.shape[0])  # a different upstream gradient per pair
    (out.losses * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("kind", ["llama2", "llama3", "llama3_2", "qwen2", "mistral", "lora_output"])
@pytest.mark.parametrize("row_len", [None, 64])
def test_packed_equals_padded_with_gradients(kind, row_len):
    model = _model(kind)
    items = _items()
    loss_fn = SimPOLoss(beta=2.0, gamma=0.5, sft_weight=0.3)
    padded = padded_collate_preference(items, padding_idx=0)
    packed = packed_collate_preference(items, padding_idx=0, row_len=row_len)
    if row_len == 64:
        assert packed["tokens"].shape[0] < len(items)  # several pairs share a row
    ref, ref_grads = _run(model, padded, loss_fn)
    out, grads = _run(model, packed, loss_fn)
    for name in ("losses", "chosen_rewards", "rejected_rewards"):
        assert_close(getattr(out, name), getattr(ref, name), atol=1e-5, rtol=1e-5, msg=name)
    for half in ("chosen", "rejected"):
        a, r = getattr(out, half), getattr(ref, half)
        assert_close(a.logps, r.logps, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.num_tokens, r.num_tokens)
        assert_close(a.logits_mean, r.logits_mean, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # the same pairs and tokens are counted, and packing computed fewer positions
    assert int(packed["num_tokens"]) == int(padded["num_tokens"])
    assert int(packed["chosen_tokens"]) == int(padded["chosen_tokens"])
    assert int(packed["packed_tokens"]) < int(padded["num_tokens"])
    assert torch.equal(packed["rows"], padded["rows"])


def test_padded_logits_mean_counts_real_positions_only():
    """logits/chosen|rejected: the mean logit over a sequence's own positions and the vocab, in
    both layouts (padding positions are not the sequence's)."""
    model = _model("llama2")
    items = _items()[:2]
    padded = padded_collate_preference(items, padding_idx=0)
    out = preference_forward(model, padded, SimPOLoss(), device=torch.device("cpu"))
    with torch.no_grad():
        logits = model(padded["tokens"])
    n = [len(it["chosen_input_ids"]) for it in items] + [len(it["rejected_input_ids"]) for it in items]
    want = torch.stack([logits[i, : n[i]].mean() for i in range(4)])
    got = torch.cat([out.chosen.logits_mean, out.rejected.logits_mean])
    assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_layout_and_mask_by_hand():
    # prompt [7 8], chosen [1 2 3], rejected [1 4]: shared prefix [7 8 1] (3 tokens), then the
    # chosen suffix [2 3] at positions 3, 4 and the rejected suffix [4] at position 3.
    item = {
        "chosen_input_ids": [7, 8, 1, 2, 3], "chosen_labels": [IGN, IGN, 1, 2, 3],
        "rejected_input_ids": [7, 8, 1, 4], "rejected_labels": [IGN, IGN, 1, 4], "row": 0,
    }
    out = packed_collate_preference([item], pad_to_multiple_of=8)
    assert out["tokens"].tolist() == [[7, 8, 1, 2, 3, 4, 0, 0]]
    assert out["input_pos"][0, :6].tolist() == [0, 1, 2, 3, 4, 3]
    assert out["doc_kind"][0].tolist() == [SHARED] * 3 + [CHOSEN] * 2 + [REJECTED] + [PAD] * 2
    plan = out["plan"]
    # chosen: tokens 1 2 3 predicted at positions 1 2 3; rejected: 1 at 1, 4 at 2 (the last
    # shared position, which also predicts the chosen token 2)
    assert plan.score_index.tolist() == [1, 2, 3, 1, 2]
    assert plan.score_targets.tolist() == [1, 2, 3, 1, 4]
    assert plan.score_seq.tolist() == [0, 0, 0, 1, 1]
    assert plan.seq_positions.tolist() == [5, 4]
    mask = packed_attention_mask(out["doc_pair"], out["doc_kind"], block_mask=False)[0].int().tolist()
    assert mask[5] == [1, 1, 1, 0, 0, 1, 0, 0]  # rejected: the shared prefix and itself, never chosen
    assert mask[4] == [1, 1, 1, 1, 1, 0, 0, 0]  # chosen: causal over shared + chosen
    assert mask[6] == [0, 0, 0, 0, 0, 0, 1, 0]  # padding attends to itself only (no NaN row)
    assert out["num_tokens"].item() == 9 and out["packed_tokens"].item() == 6


def test_several_pairs_in_a_row_do_not_attend_across():
    items = _items()
    out = packed_collate_preference(items, row_len=200)
    assert out["tokens"].shape[0] == 1
    mask = packed_attention_mask(out["doc_pair"], out["doc_kind"], block_mask=False)[0]
    pair = out["doc_pair"][0]
    real = pair < len(items)
    cross = mask & (pair[:, None] != pair[None, :])
    assert not cross.any() and real.sum() == out["packed_tokens"]


def test_sequence_without_scored_token_names_it():
    item = {
        "chosen_input_ids": [5, 6, 7], "chosen_labels": [IGN, IGN, IGN],
        "rejected_input_ids": [5, 6, 8], "rejected_labels": [IGN, IGN, 8], "row": 3,
    }
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        packed_collate_preference([item])


def test_gemma2_is_reported_unsupported_and_llama_supported():
    from torchtune.models.gemma2 import gemma2

    g = gemma2(vocab_size=V, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=32, head_dim=16,
               intermediate_dim=64, max_seq_len=32)
    assert "Gemma2Attention" in packing_unsupported_reason(g)
    assert packing_unsupported_reason(_model("llama3")) is None


@pytest.mark.parametrize("kind", ["qwen2", "lora_output"])
@pytest.mark.parametrize("packed", [False, True])
def test_step_needs_no_host_sync(kind, packed):
    """Forward and backward of the step run with the model and the batch on the meta device,
    where any data-dependent op (.item(), .nonzero(), boolean-mask indexing: each a host sync
    on CUDA) raises: the scoring plan and the empty-row check come from the CPU collate."""
    from prefopt.loss import CPOLoss, ORPOLoss

    with torch.device("meta"):
        model = _model(kind)
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    collate = packed_collate_preference if packed else padded_collate_preference
    for loss_fn in (SimPOLoss(sft_weight=0.5), CPOLoss(), ORPOLoss()):
        out = preference_forward(model, collate(_items()), loss_fn, device=torch.device("meta"))
        out.losses.sum().backward()
        assert out.losses.is_meta and out.losses.shape == (6,)


def test_one_row_unpadded_and_still_exact():
    """The default layout: one row of exactly the pairs' length (at least MIN_FLEX_LEN on CUDA),
    rows of at most max_seq_len when they do not fit together, same numbers."""
    from torchtune.models.llama3 import llama3

    from prefopt.packing import MIN_FLEX_LEN

    torch.manual_seed(0)
    model = llama3(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=1024,
                   intermediate_dim=64)
    items = _items()
    loss_fn = SimPOLoss(beta=2.0, gamma=0.5)
    ref, ref_grads = _run(model, padded_collate_preference(items, padding_idx=0), loss_fn)
    unpadded = packed_collate_preference(items, max_seq_len=1024)
    assert unpadded["tokens"].shape == (1, 82) and int(unpadded["packed_tokens"]) == 82  # no padding
    one_row = packed_collate_preference(items, min_len=MIN_FLEX_LEN, max_seq_len=1024)
    assert one_row["tokens"].shape == (1, MIN_FLEX_LEN)  # 82 positions, raised to the minimum
    # the model takes at most 64 positions: rows of at most 64, as long as the longest
    capped = packed_collate_preference(items, max_seq_len=64)
    assert capped["tokens"].shape[0] == 2 and capped["tokens"].shape[1] <= 64
    for packed in (unpadded, one_row, capped):
        out, grads = _run(model, packed, loss_fn)
        assert_close(out.losses, ref.losses, atol=1e-5, rtol=1e-5)
        for name, g in grads.items():
            assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4)
    # a pair longer than the model's limit once packed: that batch is laid out padded
    def packed_len(it):
        c, r = it["chosen_input_ids"], it["rejected_input_ids"]
        k = next((i for i, (x, y) in enumerate(zip(c, r)) if x != y), min(len(c), len(r)))
        return len(c) + len(r) - k

    longest = max(packed_len(it) for it in items)
    fallback = packed_collate_preference(items, max_seq_len=longest - 1)
    assert "input_pos" not in fallback and fallback["tokens"].shape[0] == 2 * len(items)


def test_row_layout_by_hand():
    """Which pairs share a row, worked by hand: first-fit-decreasing at row_len, else one unpadded
    row (when that does not fit the model's length: the rows with the fewest positions; at least
    min_len), None past the limit."""
    from prefopt.packing import row_layout

    assert row_layout([5, 3, 2], row_len=6) == ([[0], [1, 2]], 5)
    assert row_layout([5, 3, 2], row_len=6, pad_to_multiple_of=4) == ([[0], [1, 2]], 8)
    assert row_layout([5, 3, 2], row_len=6, pad_to_multiple_of=4, max_seq_len=7) == ([[0], [1, 2]], 7)  # capped
    assert row_layout([5, 3, 2]) == ([[0, 1, 2]], 10)  # no padding
    assert row_layout([5, 3, 2], min_len=256) == ([[0, 1, 2]], 256)  # MIN_FLEX_LEN
    assert row_layout([5, 3, 2], min_len=256, max_seq_len=100) == ([[0, 1, 2]], 100)  # raised, capped
    assert row_layout([500, 300, 101]) == ([[0, 1, 2]], 901)
    assert row_layout([500, 300, 101], pad_to_multiple_of=8) == ([[0, 1, 2]], 904)
    # not fitting together: the capacity whose rows pad least (first-fit-decreasing at the model's
    # 400 would give [[0, 2], [1]] of 400 or 350: 800 or 700 positions; these are 600)
    assert row_layout([300, 200, 100], max_seq_len=400) == ([[0], [1, 2]], 300)
    assert row_layout([300, 200, 50], max_seq_len=400) == ([[0], [1, 2]], 300)
    assert row_layout([300, 200, 100, 100], max_seq_len=400) == ([[0, 2], [1, 3]], 400)  # 800, none less
    assert row_layout([300, 200, 100, 100], max_seq_len=400, min_len=256) == ([[0, 2], [1, 3]], 400)
    assert row_layout([5, 9], max_seq_len=8) is None


def _ultrafeedback_like_items(n, seed=0, max_pair=2040):
    """``n`` pairs of benchmarks/make_pref_data.py's lengths (log-normal words per part at its
    medians and sigma, ~1.9 tokens of the tiny tokenizer per word), random token ids; each pair's
    packed length is at most ``max_pair``."""
    import math
    import random

    from benchmarks.make_pref_data import MEDIAN_WORDS, SIGMA

    rng = random.Random(seed)
    items = []
    for i in range(n):
        p, c, r = (max(1, int(1.9 * MEDIAN_WORDS[k] * math.exp(rng.gauss(0.0, SIGMA)))) for k in ("prompt", "chosen", "rejected"))
        c, r = min(c, max_pair // 3), min(r, max_pair // 3)
        p = min(p, max_pair - c - r)
        prompt = [rng.randrange(1, V) for _ in range(p)]
        ch, rj = ([rng.randrange(1, V) for _ in range(k)] for k in (c, r))
        items.append({"chosen_input_ids": prompt + ch, "chosen_labels": [IGN] * p + ch,
                      "rejected_input_ids": prompt + rj, "rejected_labels": [IGN] * p + rj, "row": i})
    return items


def test_flex_attention_compiles_once_for_varying_lengths():
    """CPU proxy of the packed layout's CUDA path (its FlexAttention forward compiles on the CPU
    in torch 2.13; the backward does not): the CUDA collate (one_row), the BlockMask
    construction and the attention call the step installs in every torchtune attention layer,
    driven through a decoder's forward with 30 micro-batches of UltraFeedback-like lengths (2
    pairs each; the model takes at most 2,048 positions, so some micro-batches are 2 rows, which
    FlexAttention sees as one): FlexAttention is compiled FLEX_COMPILES (1) times, and the
    outputs equal the dense-mask path's (SDPA) to 1e-5."""
    from torch._dynamo.utils import counters
    from torchtune.models.llama3_2 import llama3_2

    from prefopt.attention import FLEX_COMPILES, flex_compile_count, use_packed_attention
    from prefopt.packing import MIN_FLEX_LEN

    torch.manual_seed(0)
    model = llama3_2(vocab_size=V, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, max_seq_len=2048,
                     intermediate_dim=64).eval()
    assert use_packed_attention(model) == 2 and use_packed_attention(model) == 0  # idempotent
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    items = _ultrafeedback_like_items(60)
    shapes = set()
    for k in range(30):
        batch = packed_collate_preference(items[2 * k : 2 * k + 2], min_len=MIN_FLEX_LEN, max_seq_len=2048)
        shapes.add(tuple(batch["tokens"].shape))
        pair, kind = batch["doc_pair"], batch["doc_kind"]
        with torch.no_grad():
            flex = model(batch["tokens"], mask=packed_attention_mask(pair, kind, block_mask=True),
                         input_pos=batch["input_pos"])
            dense = model(batch["tokens"], mask=packed_attention_mask(pair, kind, block_mask=False),
                          input_pos=batch["input_pos"])
        assert_close(flex, dense, atol=1e-5, rtol=1e-5, msg=lambda m: f"micro-batch {k}: {m}")
        assert flex_compile_count() == FLEX_COMPILES, f"micro-batch {k} {tuple(batch['tokens'].shape)} compiled again"
    assert counters["stats"]["unique_graphs"] - graphs == FLEX_COMPILES
    assert len(shapes) >= 25 and {r for r, _ in shapes} == {1, 2}  # ~a new shape every micro-batch


def test_shared_prefix_attention_equals_the_dense_mask():
    """prefopt.attention.SharedPrefixRows (documents laid end to end, each a prefix and parts that
    see it and themselves): one SDPA call per prefix and part equals SDPA under the packed layout's
    dense mask of the same rows (doc_kind 0 for a prefix, j + 1 for part j), outputs and the
    gradients of q, k, v to 1e-5, on every real position; documents with no prefix, one part,
    padding between and after them; padding positions come out 0; the structure read back from
    the doc tensors (shared_prefix_rows) is the one given."""
    from prefopt.attention import SharedPrefixRows, shared_prefix_attention
    from prefopt.packing import shared_prefix_rows

    g = torch.Generator().manual_seed(0)
    rows = SharedPrefixRows(docs=(
        ((0, 5, (4, 1, 6)),),  # 16 positions, no padding
        ((0, 0, (7,)), (9, 2, (1, 2))),  # no prefix; padding at 7-8; a second document; padding after
        ((2, 3, (2, 2)),),  # padding first
    ))
    R, H, L, D = 3, 2, 16, 8
    q, k, v = (torch.randn(R, H, L, D, generator=g, requires_grad=True) for _ in range(3))
    doc = 100 + torch.arange(R * L).view(R, L)  # padding: an id of its own each
    kind = torch.full((R, L), 3)
    for r, docs in enumerate(rows.docs):
        for j, (start, p, parts) in enumerate(docs):
            n = p + sum(parts)
            doc[r, start:start + n] = j
            kind[r, start:start + n] = torch.repeat_interleave(torch.arange(len(parts) + 1), torch.tensor((p, *parts)))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=packed_attention_mask(doc, kind, block_mask=False)[:, None])
    out = shared_prefix_attention(q, k, v, rows)
    real = doc < 100
    w = torch.randn(R, L, H, D, generator=g) * real[..., None, None]  # a loss on the real positions
    grads_dense = torch.autograd.grad((dense.transpose(1, 2) * w).sum(), (q, k, v))
    grads = torch.autograd.grad((out.transpose(1, 2) * w).sum(), (q, k, v))
    assert_close(out.transpose(1, 2)[real], dense.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_dense):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert out.transpose(1, 2)[~real].abs().sum() == 0 and (~real).sum() == 0 + 4 + 9
    # kinds 1..k of the reward's rows, PAD = 3 only where no document is: the training layout's
    # kinds (0, 1, 2) here, so the structure reads back exactly
    two = SharedPrefixRows(docs=(((0, 5, (4, 7)),), ((0, 0, (7,)), (9, 2, (1, 2)))))
    d2, k2 = torch.full((2, L), 0), torch.full((2, L), 3)
    d2[0], d2[1] = 100 + torch.arange(L), 200 + torch.arange(L)
    for r, docs in enumerate(two.docs):
        for j, (start, p, parts) in enumerate(docs):
            d2[r, start:start + p + sum(parts)] = j
            k2[r, start:start + p + sum(parts)] = torch.repeat_interleave(torch.arange(len(parts) + 1), torch.tensor((p, *parts)))
    assert shared_prefix_rows(d2, k2) == two
    assert packed_attention_mask(d2, k2) == two  # the CPU's default
    with pytest.raises(ValueError, match="2 rows for 3"):
        shared_prefix_attention(q, k, v, SharedPrefixRows(docs=(((0, 1, (1,)),), ((0, 1, (1,)),))))
    with pytest.raises(ValueError, match="row 0: a document at 0 of 10 \\+ 7 positions"):
        shared_prefix_attention(q, k, v, SharedPrefixRows(docs=(((0, 10, (7,)),), (), ())))
    k2[0, 12] = 0  # a shared position after the parts
    with pytest.raises(ValueError, match="row 0: pair 0 is not one shared prefix"):
        shared_prefix_rows(d2, k2)
