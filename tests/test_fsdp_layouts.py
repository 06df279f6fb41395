"""The fused output projection stays on under every FSDP2 sharding layout a config can name, with
one all-gather of each unit per forward/backward (2 gloo processes, in-process spawn)."""

from unittest import mock

import pytest
import torch
import torch.distributed as dist
from conftest import init_gloo, spawn_gloo, watchdog
from torch.testing import assert_close

V = 128


def _model(tied: bool):
    torch.manual_seed(0)
    if tied:
        from torchtune.models.qwen2 import qwen2

        return qwen2(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64,
                     max_seq_len=64, tie_word_embeddings=True)
    from torchtune.models.llama2 import llama2

    return llama2(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=64)


def _batch(packed: bool):
    from prefopt.collate import packed_collate_preference, padded_collate_preference

    g = torch.Generator().manual_seed(1)
    items = []
    for i, (p, c, r) in enumerate([(5, 4, 6), (3, 7, 2)]):
        prompt = torch.randint(1, V, (p,), generator=g).tolist()
        ch, rj = (torch.randint(1, V, (n,), generator=g).tolist() for n in (c, r))
        items.append({"chosen_input_ids": prompt + ch, "chosen_labels": [-100] * p + ch,
                      "rejected_input_ids": prompt + rj, "rejected_labels": [-100] * p + rj, "row": i})
    return (packed_collate_preference if packed else padded_collate_preference)(items)


def _counting_fused_projection():
    """Counts calls of the fused output projection (prefopt.logprobs.linear_token_logps, which
    only the fused path of scored_token_logps calls)."""
    from prefopt import logprobs

    return mock.patch.object(logprobs, "linear_token_logps", wraps=logprobs.linear_token_logps)


def _step(model, batch):
    from prefopt.loss import SimPOLoss
    from prefopt.step import preference_forward

    out = preference_forward(model, batch, SimPOLoss(), device=torch.device("cpu"), num_chunks=2)
    out.losses.sum().backward()
    return out.losses.detach()


# (tied, custom_sharded_layers, FSDP units)
LAYOUTS = [
    (False, None, 3),  # root (embedding, norm, output) + 2 layers
    (False, ["output"], 4),  # the flagship 8B/7B full configs shard the output on its own
    (False, ["tok_embeddings", "output"], 5),
    (True, None, 3),  # tied output: the root holds the shared weight
]
CASES = [(t, lay, u, packed) for t, lay, u in LAYOUTS for packed in (False, True)]


def _worker(rank, init, out_dir):
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as pg

    from recipes.simpo_full_distributed import _shard_model

    init_gloo(rank, 2, init)
    torch.set_num_threads(1)
    gathers = []
    real = pg.foreach_all_gather

    def counting(*args, **kwargs):
        gathers.append(1)
        return real(*args, **kwargs)

    pg.foreach_all_gather = counting
    results = {}
    for i, (tied, layout, _, packed) in enumerate(CASES):
        watchdog()
        model = _model(tied)
        full = {k: v.clone() for k, v in model.state_dict().items()}
        _shard_model(model, custom_sharded_layers=layout, cpu_offload=False, reshard_after_forward=True, mp_policy=None)
        gathers.clear()
        with _counting_fused_projection() as fused:
            losses = _step(model, _batch(packed))
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        results[i] = {"fused": fused.call_count, "gathers": len(gathers), "losses": losses,
                      "full": full, "grads": grads}
    # a file, not a multiprocessing.Manager: a Manager's server process received every tensor as
    # a shared-memory file descriptor, and in one CI run (2026-12-03) it was gone before rank 0's
    # first result (EOFError), failing all 8 cases; a file needs no third process
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp_layouts")
    spawn_gloo(_worker, out_dir, str(out_dir))
    return {(rank, i): r for rank in (0, 1) for i, r in torch.load(out_dir / f"rank{rank}.pt").items()}


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"tied={t}-{lay}-packed={p}" for t, lay, _, p in CASES])
def test_fused_projection_under_every_sharding_layout(sharded_runs, case):
    tied, layout, units, packed = CASES[case]
    # the reference: the same model unsharded, one process
    model = _model(tied)
    model.load_state_dict(sharded_runs[(0, case)]["full"])
    with _counting_fused_projection() as fused:
        ref = _step(model, _batch(packed))
    assert fused.call_count == 1
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for rank in (0, 1):
        r = sharded_runs[(rank, case)]
        assert r["fused"] == 1, f"rank {rank}: the fused projection ran {r['fused']} times"
        # every unit is gathered once in forward; in backward every unit but the root (which
        # is not resharded after forward) is gathered again
        assert r["gathers"] == units + (units - 1), r["gathers"]
        assert_close(r["losses"], ref, atol=1e-6, rtol=1e-6)
        assert r["grads"].keys() == ref_grads.keys()
        for name, g in r["grads"].items():
            # FSDP2 averages gradients over ranks; both ranks saw the same batch
            assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_tied_output_with_tok_embeddings_sharded_is_rejected():
    from recipes.simpo_full_distributed import sharding_problem

    msg = sharding_problem(_model(tied=True), ["tok_embeddings"])
    assert "custom_sharded_layers=['tok_embeddings']" in msg and "tied" in msg
    assert sharding_problem(_model(tied=False), ["tok_embeddings", "output"]) is None
