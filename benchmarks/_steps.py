"""The SimPO loss step, as the recipe runs it and as variants, for the profile and memory sweep.

Every variant maps (model, tokens, labels) to the per-pair SimPO losses and runs backward, and
each gives the same losses and gradients as ``ours`` (``profile_step.py`` checks it):

* ``ours``          recipes' step + backward: prefopt.step.preference_forward (only the
                    positions that predict a response token go through the output layer, fused with
                    the log-softmax, no logits kept for backward) -> prefopt.loss.SimPOLoss.
* ``chunked_logits`` the recipes' path before the profile (session 1): the model's chunked logits
                    over every position (``set_num_output_chunks(8)``) ->
                    prefopt.logprobs.sequence_logps (with the ``logits_mean`` pass) -> SimPOLoss.
* ``naive``         whole logits -> torchtune's ``rlhf.get_batch_log_probs`` (log_softmax + gather,
                    what torchtune's DPO recipes and, with a row loop, TRL do) -> SimPOLoss.
* ``response_only`` hidden states -> only the scored positions -> output layer in chunks ->
                    prefopt.logprobs.token_logps (each chunk's logits saved for backward): the
                    module path model_sequence_logps takes for non-linear output layers.
* ``response_only_ce`` ``response_only`` with ``-F.cross_entropy(..., reduction="none")`` as the
                    per-token log-prob (ATen's fused log_softmax forward/backward kernels).

Only ``ours`` is what the recipes run; the others are for comparison in the profile and sweep.
"""

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE
from torchtune.rlhf import get_batch_log_probs

from prefopt.logprobs import _chunk_bounds, score_plan_from_labels, sequence_logps, token_logps
from prefopt.loss import SimPOLoss
from prefopt.step import preference_forward

SHAPE = dict(num_layers=4, num_heads=4, num_kv_heads=4, embed_dim=256, intermediate_dim=688, max_seq_len=4096, norm_eps=1e-5)
LORA = dict(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=False, apply_lora_to_output=False, lora_rank=8, lora_alpha=16, lora_dropout=0.0)
NUM_OUTPUT_CHUNKS = 8  # chunked_logits / response_only: the pre-profile recipe setting
OURS_CHUNKS = 16  # the recipes' num_output_chunks default (chunks of the response positions)
assert OURS_CHUNKS == __import__("recipes.simpo_lora_single_device").simpo_lora_single_device.CONFIG_SPEC["num_output_chunks"].default


def build_model(vocab: int, lora: bool = True, seed: int = 0) -> torch.nn.Module:
    from torchtune.models.llama2 import llama2, lora_llama2
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    torch.manual_seed(seed)
    if lora:
        model = lora_llama2(vocab_size=vocab, **LORA, **SHAPE)
        set_trainable_params(model, get_adapter_params(model))
    else:
        model = llama2(vocab_size=vocab, **SHAPE)
    return model


def make_batch(pairs: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """[2*pairs, 1+P+R+1] tokens (chosen rows then rejected rows, shared prompts) and labels
    (IGNORE on BOS + prompt), the layout of prefopt.collate.padded_collate_preference."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab, (pairs, prompt_len), generator=g)
    rows, labels = [], []
    for _side in range(2):
        resp = torch.randint(3, vocab, (pairs, response_len), generator=g)
        seq = torch.cat([torch.ones(pairs, 1, dtype=torch.long), prompts, resp, torch.full((pairs, 1), 2)], dim=1)
        lab = seq.clone()
        lab[:, : 1 + prompt_len] = IGNORE
        rows.append(seq)
        labels.append(lab)
    return torch.cat(rows), torch.cat(labels)


def _split(logps: torch.Tensor, loss_fn) -> torch.Tensor:
    b = logps.shape[0] // 2
    losses, _, _ = loss_fn(logps[:b], logps[b:])
    return losses


def step_ours(model, tokens, labels, loss_fn):
    batch = {"tokens": tokens, "plan": score_plan_from_labels(labels)}  # the padded collate's layout
    return preference_forward(model, batch, loss_fn, device=tokens.device, num_chunks=OURS_CHUNKS).losses


def step_chunked_logits(model, tokens, labels, loss_fn):
    model.set_num_output_chunks(NUM_OUTPUT_CHUNKS)
    logits = model(tokens)
    out = sequence_logps(logits, labels)
    del logits
    return _split(out.logps, loss_fn)


def step_naive(model, tokens, labels, loss_fn):
    model.set_num_output_chunks(0)
    logits = model(tokens)  # [b, s, v] float32
    logps = get_batch_log_probs(logits, labels, return_average_logprobs=True)
    return _split(logps, loss_fn)


def hidden_states(model, tokens: torch.Tensor) -> torch.Tensor:
    """TransformerDecoder.forward up to (and including) the final norm, without the output layer."""
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h)
    return model.norm(h)


def _scored(labels: torch.Tensor):
    """(flat positions whose next token is scored, their targets, row of each, tokens per row)."""
    bsz = labels.shape[0]
    targets = torch.cat([labels[:, 1:], labels.new_full((bsz, 1), IGNORE)], dim=1)
    mask = targets != IGNORE
    rows = torch.arange(bsz).unsqueeze(1).expand_as(mask)[mask]
    return mask, targets[mask], rows, mask.sum(-1)


def step_response_only(model, tokens, labels, loss_fn):
    h = hidden_states(model, tokens)
    mask, tgt, rows, counts = _scored(labels)
    hs = h[mask]  # [N, d]
    del h
    tok = torch.cat([token_logps(model.output(hs[s:e]), tgt[s:e]) for s, e in _chunk_bounds(hs.shape[0], NUM_OUTPUT_CHUNKS)])
    total = torch.zeros(labels.shape[0], dtype=torch.float32).index_add(0, rows, tok)
    return _split(total / counts, loss_fn)


def step_response_only_ce(model, tokens, labels, loss_fn):
    """response_only with the log-probs from F.cross_entropy (ATen's fused log_softmax kernels:
    fewer passes over each [chunk, vocab] block than logsumexp + gather + exp in backward)."""
    h = hidden_states(model, tokens)
    mask, tgt, rows, counts = _scored(labels)
    hs = h[mask]
    del h
    tok = torch.cat([-F.cross_entropy(model.output(hs[s:e]).float(), tgt[s:e], reduction="none")
                     for s, e in _chunk_bounds(hs.shape[0], NUM_OUTPUT_CHUNKS)])
    total = torch.zeros(labels.shape[0], dtype=torch.float32).index_add(0, rows, tok)
    return _split(total / counts, loss_fn)


STEPS: Dict[str, Callable] = {
    "ours": step_ours,
    "chunked_logits": step_chunked_logits,
    "naive": step_naive,
    "response_only": step_response_only,
    "response_only_ce": step_response_only_ce,
}


def loss_fn() -> SimPOLoss:
    return SimPOLoss(beta=2.0, gamma=0.5)


def run_step(variant: str, model, tokens, labels, lf) -> torch.Tensor:
    losses = STEPS[variant](model, tokens, labels, lf)
    loss = losses.mean()
    loss.backward()
    return loss.detach()
