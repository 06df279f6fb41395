"""Peer parity for the reference-free family: CPO-SimPO, AlphaPO, CPO (sigmoid/hinge), IPO and ORPO
against the installed TRL's own functions, on the same random logits and labels (CPU, float32).

What runs on each side:

* **TRL** (``trl.experimental.cpo.CPOTrainer`` / ``trl.experimental.orpo.ORPOTrainer``): the real
  ``get_batch_loss_metrics`` -> ``concatenated_inputs`` -> ``concatenated_forward`` (its
  ``get_batch_logps`` with the loss type's ``average_log_prob``, and its ``nn.CrossEntropyLoss``
  NLL term) -> ``cpo_loss`` / ``odds_ratio_loss``, called on an instance made with ``__new__``
  (no ``__init__``: no model, tokenizer or dataset) carrying the attributes those methods read,
  and a stub model whose ``forward`` returns our logits. Gradient accumulation is
  ``Trainer.training_step``'s: each micro-batch's loss divided by the number of micro-batches
  (``CPOTrainer``/``ORPOTrainer`` set ``loss_is_scaled_for_ga = False``), gradients summed.
* **Ours**: ``prefopt.logprobs.sequence_logps`` on the same logits (``average`` from the loss's
  ``logps_reduction``), ``chosen_nll`` formed per the step's protocol (``prefopt/loss.py``'s module
  docstring), the loss's per-example ``losses`` averaged over the examples of the step.

**Gradient accumulation.** TRL's NLL term is a token mean *per micro-batch*; the step's ``"token"``
term is a token mean over the *whole optimizer step*. With two micro-batches of different chosen
token counts they differ (measured below); ours equals TRL run on the step as one batch, and
reproducing TRL's per-micro-batch mean from our loss (normalising ``chosen_nll`` per micro-batch)
matches TRL's accumulated gradients to 1e-6.
"""

import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.testing import assert_close

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("transformers")
pytest.importorskip("trl")
try:
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
except ImportError:  # pragma: no cover - depends on the installed TRL
    pytest.skip("this TRL has no trl.experimental.cpo / orpo", allow_module_level=True)

from prefopt.logprobs import sequence_logps
from prefopt.loss import CPOLoss, ORPOLoss, SimPOLoss

pytestmark = pytest.mark.peer

IGNORE = -100
PAD = 0
VOCAB = 32
TOL = 1e-6
# (prompt, chosen, rejected) token counts per pair: unequal response lengths everywhere; micro-batch
# A = rows 0-1 (chosen response tokens 2 + 11 = 13, chosen non-pad tokens after the shift 15),
# B = rows 2-3 (9, and 17).
LENGTHS = [(3, 2, 9), (1, 11, 4), (8, 6, 2), (2, 3, 12)]
A, B, ALL = [0, 1], [2, 3], [0, 1, 2, 3]

# Every parity case: (our loss, the TRL trainer class, TRL's config attributes)
CASES = {
    "cpo_simpo": (
        lambda: SimPOLoss(beta=2.5, gamma=1.4, sft_weight=1.0),  # sft_reduction="token", the default
        CPOTrainer, dict(loss_type="simpo", beta=2.5, simpo_gamma=1.4, cpo_alpha=1.0, alpha=0.0, label_smoothing=0.0),
    ),
    "simpo_smoothed_cpo_alpha_0.5": (
        lambda: SimPOLoss(beta=2.0, gamma=0.5, label_smoothing=0.1, sft_weight=0.5),
        CPOTrainer, dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.5, alpha=0.0, label_smoothing=0.1),
    ),
    "alphapo": (  # TRL's loss_type="alphapo" = simpo with cpo_alpha 0
        lambda: SimPOLoss(beta=2.5, gamma=1.0, alpha=0.25),
        CPOTrainer, dict(loss_type="simpo", beta=2.5, simpo_gamma=1.0, cpo_alpha=0.0, alpha=0.25, label_smoothing=0.0),
    ),
    "cpo_sigmoid": (
        lambda: CPOLoss(beta=0.1, cpo_alpha=1.0),
        CPOTrainer, dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0, alpha=0.0, label_smoothing=0.0),
    ),
    "cpo_sigmoid_smoothed_alphapo": (
        lambda: CPOLoss(beta=0.1, label_smoothing=0.2, cpo_alpha=0.5, alpha=0.02),
        CPOTrainer, dict(loss_type="sigmoid", beta=0.1, cpo_alpha=0.5, alpha=0.02, label_smoothing=0.2),
    ),
    "cpo_hinge": (
        lambda: CPOLoss(beta=0.1, loss_type="hinge", cpo_alpha=1.0),
        CPOTrainer, dict(loss_type="hinge", beta=0.1, cpo_alpha=1.0, alpha=0.0, label_smoothing=0.0),
    ),
    "ipo": (
        lambda: CPOLoss(beta=0.5, loss_type="ipo", cpo_alpha=1.0),
        CPOTrainer, dict(loss_type="ipo", beta=0.5, cpo_alpha=1.0, alpha=0.0, label_smoothing=0.0),
    ),
    "orpo": (
        lambda: ORPOLoss(beta=0.1),
        ORPOTrainer, dict(beta=0.1),
    ),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# data: a TRL-collated batch (right padding, prompt and padding labelled -100) and leaf logits


def make_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seq = max(p + max(c, r) for p, c, r in LENGTHS) + 1
    batch = {}
    for side, k in (("chosen", 1), ("rejected", 2)):
        ids = torch.full((len(LENGTHS), seq), PAD, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for i, lens in enumerate(LENGTHS):
            n = lens[0] + lens[k]
            ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
            labels[i, lens[0] : n] = ids[i, lens[0] : n]
            mask[i, :n] = 1
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    logits = {
        side: (torch.randn(len(LENGTHS), seq, VOCAB, generator=g) * 2).requires_grad_()
        for side in ("chosen", "rejected")
    }
    return batch, logits


def rows(batch, idx):
    return {k: v[idx] for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# TRL's side: the trainer's own methods on an uninitialised instance


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x


class _StubModel(nn.Module):
    """Returns the leaf logits of the selected rows, in TRL's concatenated [chosen; rejected] order,
    after checking that TRL concatenated the batch as expected."""

    def __init__(self, logits, batch, idx):
        super().__init__()
        self.logits, self.batch, self.idx = logits, batch, idx

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        expected = torch.cat([self.batch["chosen_input_ids"][self.idx], self.batch["rejected_input_ids"][self.idx]])
        assert torch.equal(input_ids, expected) and attention_mask is not None and use_cache is False
        return SimpleNamespace(logits=torch.cat([self.logits["chosen"][self.idx], self.logits["rejected"][self.idx]]))


def trl_trainer(cls, attrs):
    trainer = cls.__new__(cls)  # no __init__: the loss methods read only the attributes below
    trainer.__dict__.update(
        is_encoder_decoder=False, pad_token_id=PAD, padding_value=PAD, aux_loss_enabled=False,
        accelerator=_Accelerator(), **attrs,
    )
    return trainer


def trl_run(cls, attrs, batch, logits, idx):
    """TRL on the rows ``idx`` as one micro-batch: (total loss, per-example losses, chosen rewards,
    rejected rewards, metrics)."""
    trainer = trl_trainer(cls, attrs)
    model = _StubModel(logits, batch, idx)
    loss, metrics = trainer.get_batch_loss_metrics(model, rows(batch, idx))
    with torch.no_grad():
        out = trainer.concatenated_forward(model, rows(batch, idx))
        if cls is CPOTrainer:
            losses, cr, rr = trainer.cpo_loss(out[0], out[1])
        else:
            losses, cr, rr, _, _ = trainer.odds_ratio_loss(out[0], out[1])
            losses = out[4] - losses  # per example: nll - beta * log sigmoid(log odds); the mean is TRL's loss
    return loss, losses, cr, rr, metrics


def trl_grads(cls, attrs, batch, logits, micro_batches):
    """Trainer.training_step under gradient accumulation: each micro-batch loss / len(micro_batches)."""
    for t in logits.values():
        t.grad = None
    for idx in micro_batches:
        loss = trl_run(cls, attrs, batch, logits, idx)[0]
        (loss / len(micro_batches)).backward()
    return {k: t.grad.clone() for k, t in logits.items()}


# ---------------------------------------------------------------------------------------------
# our side: sequence_logps + the loss, chosen_nll formed as the step's protocol says


def nll_labels(batch, loss):
    """The tokens the NLL term scores: the chosen response (princeton, TRL's CPO), or for ORPO, as
    TRL's ORPOTrainer (and the authors' code), every non-padding token of the chosen sequence."""
    if isinstance(loss, ORPOLoss):
        return torch.where(batch["chosen_attention_mask"] == 1, batch["chosen_input_ids"], IGNORE)
    return batch["chosen_labels"]


def ours_losses(loss, batch, logits, idx, nll_scale=None, nll_tokens="as_trl"):
    """Our per-example (losses, chosen rewards, rejected rewards, metrics) for the rows ``idx``.

    ``chosen_nll`` is formed as the step's protocol says: ``"sequence"``: ``-sum_i / n_tokens_i``;
    ``"token"``: ``-sum_i * n_examples / n_tokens`` with ``nll_scale = (n_examples, n_tokens)`` of
    the whole optimizer step (default: the rows ``idx`` are the step). ``nll_tokens="response"``
    scores only the response tokens in the NLL (what the step scores) instead of TRL's choice."""
    average = loss.logps_reduction == "average"
    chosen = sequence_logps(logits["chosen"][idx], batch["chosen_labels"][idx], average=average).logps
    rejected = sequence_logps(logits["rejected"][idx], batch["rejected_labels"][idx], average=average).logps
    chosen_nll = None
    if loss.chosen_nll is not None:
        labels = (batch["chosen_labels"] if nll_tokens == "response" else nll_labels(batch, loss))[idx]
        seq = sequence_logps(logits["chosen"][idx], labels, average=False)
        if loss.chosen_nll == "sequence":
            chosen_nll = -seq.logps / seq.num_tokens
        else:
            n_examples, n_tokens = nll_scale or (len(idx), seq.num_tokens.sum().item())
            chosen_nll = -seq.logps * n_examples / n_tokens
    losses, cr, rr = loss(chosen, rejected, chosen_nll=chosen_nll)
    return losses, cr, rr, loss.metrics(chosen, rejected, chosen_nll=chosen_nll)


def nll_token_count(loss, batch, idx):
    return (nll_labels(batch, loss)[idx][:, 1:] != IGNORE).sum().item()


def ours_grads(loss, batch, logits, micro_batches, step_global=True):
    """Our optimizer step over ``micro_batches``: sum over all examples of losses_i / n_examples,
    one backward per micro-batch. ``step_global=False`` normalises the "token" NLL per micro-batch
    and weights each micro-batch 1/len(micro_batches) instead (what TRL does)."""
    for t in logits.values():
        t.grad = None
    n_step = sum(len(mb) for mb in micro_batches)
    step_scale = (n_step, sum(nll_token_count(loss, batch, mb) for mb in micro_batches))
    total = 0.0
    for mb in micro_batches:
        if step_global:
            mb_loss = ours_losses(loss, batch, logits, mb, nll_scale=step_scale)[0].sum() / n_step
        else:
            mb_loss = ours_losses(loss, batch, logits, mb)[0].mean() / len(micro_batches)
        mb_loss.backward()
        total += mb_loss.item()
    return total, {k: t.grad.clone() for k, t in logits.items()}


FIGURES = {}  # (case, quantity) -> max abs difference, printed with -s


def close(ours, ref, quantity="losses", case=None):
    """|ours - ref| <= TOL + TOL * |ref| elementwise (1e-6 absolute; for the few values of
    magnitude > 1, e.g. AlphaPO's rewards near 20, 1e-6 relative: a float32 ulp at 16-32 is 1.9e-6)."""
    ours = torch.as_tensor(ours).detach().double()
    ref = torch.as_tensor(ref).detach().double()
    assert_close(ours, ref, atol=TOL, rtol=TOL)
    node = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    key = (node.split("[")[-1].rstrip("]") if "[" in node else node.split("::")[-1], quantity)
    FIGURES[key] = max(FIGURES.get(key, 0.0), (ours - ref).abs().max().item())


@pytest.fixture(scope="module", autouse=True)
def report_figures():
    yield
    for (case, quantity), v in sorted(FIGURES.items()):
        print(f"parity {case:32s} {quantity:10s} max |diff| = {v:.3g}")


# ---------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("case", list(CASES))
def test_one_batch_losses_rewards_metrics_and_gradients_match_trl(case):
    make_loss, cls, attrs = CASES[case]
    loss = make_loss()
    batch, logits = make_batch()
    trl_loss, trl_losses, trl_cr, trl_rr, trl_metrics = trl_run(cls, attrs, batch, logits, ALL)
    losses, cr, rr, metrics = ours_losses(loss, batch, logits, ALL)
    # TRL's total loss, and per example: TRL's cpo_loss has no NLL in its per-example losses (it adds
    # cpo_alpha * the batch NLL to their mean), so compare ours less w * chosen_nll_i there; ORPO's
    # per-example loss above has TRL's batch NLL, whose mean over examples equals that of ours.
    close(losses.mean(), trl_loss)
    if loss.chosen_nll is not None:
        close(metrics["nll_loss"].mean(), trl_metrics["nll_loss"])
    if cls is CPOTrainer:
        w = loss.sft_weight if isinstance(loss, SimPOLoss) else loss.cpo_alpha
        pref = losses - w * metrics["nll_loss"] if loss.chosen_nll is not None else losses
        close(pref, trl_losses)
    else:
        close(losses - metrics["nll_loss"], trl_losses - trl_metrics["nll_loss"])
    close(cr, trl_cr, "rewards")
    close(rr, trl_rr, "rewards")
    ours_metrics = {"rewards/chosen": cr, "rewards/rejected": rr, "rewards/margins": cr - rr,
                    "rewards/accuracies": (cr > rr).float(), **metrics}
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies") + loss.metric_names:
        close(ours_metrics[name].mean(), trl_metrics[name], "metrics")
    g_trl = trl_grads(cls, attrs, batch, logits, [ALL])
    g_ours = ours_grads(loss, batch, logits, [ALL])[1]
    for k in g_trl:
        close(g_ours[k], g_trl[k], "grads")
    assert max(g.abs().max().item() for g in g_trl.values()) > 1e-3  # the gradients are not trivially 0


NLL_CASES = ["cpo_simpo", "cpo_sigmoid", "ipo", "orpo"]


@pytest.mark.parametrize("case", NLL_CASES + ["alphapo", "cpo_hinge"])
def test_gradient_accumulation_of_two(case):
    """Two micro-batches, A (rows 0-1) and B (rows 2-3), of unequal chosen token counts.

    TRL (Trainer.training_step): loss_A / 2 + loss_B / 2, each micro-batch's NLL a token mean over
    that micro-batch. The step's "token" term: one token mean over the whole optimizer step, so
    ours equals TRL run on A+B as one batch, not TRL under accumulation; normalising the NLL per
    micro-batch instead reproduces TRL's accumulation exactly. Without an NLL term (AlphaPO, or
    equal micro-batch sizes for the preference part) all three agree."""
    make_loss, cls, attrs = CASES[case]
    loss = make_loss()
    batch, logits = make_batch(seed=1)
    ours_loss, g_ours = ours_grads(loss, batch, logits, [A, B])
    trl_one = trl_grads(cls, attrs, batch, logits, [ALL])
    trl_one_loss = trl_run(cls, attrs, batch, logits, ALL)[0].item()
    for k in g_ours:
        close(g_ours[k], trl_one[k], "ga2_vs_one_batch_grads")
    close(ours_loss, trl_one_loss, "ga2_vs_one_batch_loss")

    trl_ga = trl_grads(cls, attrs, batch, logits, [A, B])
    trl_ga_loss = sum(trl_run(cls, attrs, batch, logits, mb)[0].item() for mb in (A, B)) / 2
    per_mb_loss, g_per_mb = ours_grads(loss, batch, logits, [A, B], step_global=False)
    for k in g_per_mb:
        close(g_per_mb[k], trl_ga[k], "per_microbatch_vs_trl_ga2_grads")
    close(per_mb_loss, trl_ga_loss, "per_microbatch_vs_trl_ga2_loss")

    gap = abs(ours_loss - trl_ga_loss)
    FIGURES[(case, "step_token_vs_trl_ga2_loss_gap")] = gap
    if loss.chosen_nll is None:
        assert gap <= TOL
    else:
        # the NLL weights differ: tokens of A count 1/(2*T_A) in TRL, 1/(T_A+T_B) in ours
        assert nll_token_count(loss, batch, A) != nll_token_count(loss, batch, B)
        assert gap > 1e-3


def test_orpo_nll_over_prompt_and_response_as_trl_vs_response_only():
    """TRL's ORPOTrainer (like the authors' code) puts the chosen *prompt* tokens in the NLL too
    (labels = input ids where the attention mask is 1); the parity above feeds ORPOLoss that term.
    The step's chosen_nll covers the scored response tokens only: a different number, measured here."""
    batch, logits = make_batch()
    loss = ORPOLoss(beta=0.1)
    trl_nll = trl_run(ORPOTrainer, CASES["orpo"][2], batch, logits, ALL)[4]["nll_loss"]
    as_trl = ours_losses(loss, batch, logits, ALL)[3]["nll_loss"].mean().item()
    response_only = ours_losses(loss, batch, logits, ALL, nll_tokens="response")[3]["nll_loss"].mean().item()
    close(as_trl, trl_nll, "prompt_and_response_nll")
    FIGURES[("orpo", "response_only_nll_gap")] = abs(response_only - trl_nll)
    assert abs(response_only - trl_nll) > 1e-2


def princeton_sft_loss(policy_chosen_logits, chosen_labels):
    """princeton-nlp/SimPO scripts/simpo_trainer.py, get_batch_loss_metrics' SFT term, transcribed."""
    policy_chosen_logits = policy_chosen_logits[..., :-1, :].contiguous()
    chosen_labels = chosen_labels[..., 1:].clone()
    loss_func = nn.CrossEntropyLoss()
    return loss_func(policy_chosen_logits.view(-1, policy_chosen_logits.shape[-1]), chosen_labels.view(-1))


def test_simpo_token_default_is_princetons_and_trls_sft_term():
    """Why ``sft_reduction="token"`` is the default: on one batch with unequal chosen lengths, its
    term equals princeton's ``sft_loss`` and TRL's ``cpo_alpha`` NLL; ``"sequence"`` does not."""
    batch, logits = make_batch()
    assert SimPOLoss(sft_weight=1.0).chosen_nll == "token"
    token = ours_losses(SimPOLoss(sft_weight=1.0), batch, logits, ALL)[3]["nll_loss"].mean().item()
    sequence = ours_losses(SimPOLoss(sft_weight=1.0, sft_reduction="sequence"), batch, logits, ALL)[3]["nll_loss"]
    princeton = princeton_sft_loss(logits["chosen"], batch["chosen_labels"]).item()
    trl = trl_run(CPOTrainer, CASES["cpo_simpo"][2], batch, logits, ALL)[4]["nll_loss"]
    close(token, princeton, "token_vs_princeton_sft")
    close(token, trl, "token_vs_trl_nll")
    FIGURES[("simpo", "sequence_vs_princeton_sft_gap")] = abs(sequence.mean().item() - princeton)
    assert abs(sequence.mean().item() - princeton) > 1e-2
