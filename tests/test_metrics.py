"""Tier 1: metrics are example-weighted means over micro-batches and ranks."""

import pytest
import torch
import torch.distributed as dist
from conftest import init_gloo, spawn_gloo

from prefopt.logprobs import SequenceLogps
from prefopt.loss import SimPOLoss
from prefopt.metrics import PreferenceMetrics
from prefopt.step import PreferenceOutput


def fake(n, seed):
    g = torch.Generator().manual_seed(seed)
    c = SequenceLogps(-torch.rand(n, generator=g) * 3, torch.full((n,), 5), torch.randn(n, generator=g))
    r = SequenceLogps(-torch.rand(n, generator=g) * 3, torch.full((n,), 5), torch.randn(n, generator=g))
    return c, r


def reference(loss_fn, c, r):
    losses, cr, rr = loss_fn(c.logps, r.logps)
    out = {
        "loss": losses.mean(), "rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).float().mean(), "rewards/margins": (cr - rr).mean(),
        "logps/chosen": c.logps.mean(), "logps/rejected": r.logps.mean(),
        "logits/chosen": c.logits_mean.mean(), "logits/rejected": r.logits_mean.mean(),
    }
    if loss_fn.sft_weight > 0:
        out["nll_loss"] = -c.logps.mean()
    return {k: v.item() for k, v in out.items()}


def out(loss_fn, c, r):
    return PreferenceOutput(*loss_fn(c.logps, r.logps), c, r, loss_fn.metrics(c.logps, r.logps))


def cat(a, b):
    return SequenceLogps(*(torch.cat([x, y]) for x, y in zip(a, b)))


@pytest.mark.parametrize("sft", [0.0, 0.3])
def test_uneven_micro_batches_give_whole_batch_means(sft):
    loss_fn = SimPOLoss(beta=2.5, gamma=1.0, sft_weight=sft)
    c1, r1 = fake(3, 0)
    c2, r2 = fake(7, 1)  # uneven sizes: a mean of means would be wrong
    m = PreferenceMetrics.for_loss(loss_fn, torch.device("cpu"))
    for c, r in ((c1, r1), (c2, r2)):
        m.update(out(loss_fn, c, r))
    got = m.compute()
    want = reference(loss_fn, cat(c1, c2), cat(r1, r2))
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    m.reset()
    with pytest.raises(RuntimeError, match="no accumulated"):
        m.compute()


def _worker(rank, init, out_dir):
    init_gloo(rank, 2, init)
    loss_fn = SimPOLoss(beta=2.0, gamma=0.5)
    c, r = fake(2 + 3 * rank, rank)  # ranks hold 2 and 5 examples
    m = PreferenceMetrics.for_loss(loss_fn, torch.device("cpu"))
    m.update(out(loss_fn, c, r))
    # a file, not a multiprocessing.Manager (no third process to lose: see test_fsdp_layouts)
    torch.save(m.compute(all_reduce=True), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_all_reduce_across_two_ranks(tmp_path):
    spawn_gloo(_worker, tmp_path, str(tmp_path))
    results = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)}
    loss_fn = SimPOLoss(beta=2.0, gamma=0.5)
    c0, r0 = fake(2, 0)
    c1, r1 = fake(5, 1)
    want = reference(loss_fn, cat(c0, c1), cat(r0, r1))
    for rank in (0, 1):
        for k in want:
            assert results[rank][k] == pytest.approx(want[k], abs=1e-6), (rank, k)
