"""recipes/simpo_full_distributed.py end to end through `tune run` (CPU, gloo, FSDP2).

The runs are shared through module-scoped fixtures:

* ``run2``: 2 processes, batch_size 4 x gradient_accumulation_steps 2 x 2 ranks = 16 pairs per
  step, clip_grad_norm 0.1, 10 steps, resume states at steps 5 and 10, eval at 0 and 10;
* ``run1``: the same global batch in 1 process (batch_size 8, plain `tune run`, no launcher).

Every run uses OMP_NUM_THREADS=1 (2 processes on 2 cores) and torchrun's --standalone (a free
rendezvous port, so parallel test sessions do not collide on 29500).
"""

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, complete_steps, load_recipe, read_log, tune_command, tune_env, tune_run
from torch.testing import assert_close

pytestmark = pytest.mark.slow  # tune run subprocesses (torchrun, 2 processes)
RECIPE = "recipes/simpo_full_distributed.py"
CONFIG = "configs/tiny/simpo_full.yaml"
STEPS = 10
CLIP = 0.1  # small enough that every step is clipped: the clipping path is exercised for real
MAIN = [
    f"max_steps_per_epoch={STEPS}",
    "save_every_n_steps=5",
    "eval_every_n_steps=null",
    "gradient_accumulation_steps=2",
    f"clip_grad_norm={CLIP}",
]
QUIET = ["eval_dataset=null", "eval_every_n_steps=null"]


def run(out: Path, *overrides: str, nproc: int = 2, check: bool = True, timeout: int = 600):
    return tune_run(RECIPE, CONFIG, f"output_dir={out}", *overrides, nproc=nproc, check=check, timeout=timeout)


def losses(log: dict, key: str = "loss") -> dict:
    return {s: m[key] for s, m in log.items() if key in m}


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    out = tmp_path_factory.mktemp("run2")
    proc = run(out, "batch_size=4", *MAIN)
    return out, proc


def test_packed_and_padded_layouts_log_the_same_losses_on_two_processes(run2, tmp_path):
    padded = tmp_path / "padded"
    run(padded, "batch_size=4", *MAIN, *QUIET, "packed=False")
    a, b = read_log(run2[0]), read_log(padded)
    steps = sorted(losses(a))
    assert steps == list(range(1, STEPS + 1)) and sorted(losses(b)) == steps
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logits/rejected"):
        diff = max(abs(losses(a, key)[s] - losses(b, key)[s]) for s in steps)
        assert diff <= 1e-5, (key, diff)


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    proc = run(out, "batch_size=8", *MAIN, nproc=0)  # plain `tune run`: a one-process group
    return out, proc


# ----------------------------------------------------------------------------------------------
# An independent plain-PyTorch reference: one model, the whole global batch at once, no FSDP.


def _tiny_cfg():
    from omegaconf import OmegaConf

    import prefopt  # noqa: F401  (registers ${prefopt_assets:...})

    return OmegaConf.load(REPO / CONFIG)


def _base_model(cfg, tmp_path):
    from torchtune import config as tt_config
    from torchtune.training import FullModelHFCheckpointer

    model = tt_config.instantiate(cfg.model)
    sd = FullModelHFCheckpointer(
        checkpoint_dir=str(TINY / "model"), checkpoint_files=["model.safetensors"], model_type="LLAMA2",
        output_dir=str(tmp_path / "ckpt_out"),
    ).load_checkpoint()["model"]
    model.load_state_dict(sd, strict=True)
    return model


def reference_run(tmp_path, n_steps: int, global_batch: int, clip, total_steps: int):
    """SimPO training written directly against torch: the global order is ONE permutation of
    the training pairs (generator seeded with seed + epoch), step k takes its k-th slice of
    ``global_batch`` pairs, loss = mean over them, then clip / AdamW / scheduler. Returns the
    per-step losses and pre-clip gradient norms, and the model after ``n_steps``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: 10x faster than 2 threads here
    try:
        return _reference_run(tmp_path, n_steps, global_batch, clip, total_steps)
    finally:
        torch.set_num_threads(threads)


def _reference_run(tmp_path, n_steps, global_batch, clip, total_steps):
    from torchtune import config as tt_config

    from prefopt.collate import padded_collate_preference
    from prefopt.logprobs import sequence_logps

    cfg = _tiny_cfg()
    tok = tt_config.instantiate(cfg.tokenizer)
    ds = tt_config.instantiate(cfg.dataset, tokenizer=tok)
    model = _base_model(cfg, tmp_path)
    model.set_num_output_chunks(4)
    loss_fn = tt_config.instantiate(cfg.loss)
    opt = tt_config.instantiate(cfg.optimizer, model.parameters())
    sched = tt_config.instantiate(cfg.lr_scheduler, opt, num_training_steps=total_steps, last_epoch=-1)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed + 0)).tolist()
    out_losses, norms = [], []
    for k in range(n_steps):
        batch = padded_collate_preference([ds[i] for i in order[k * global_batch : (k + 1) * global_batch]], tok.pad_id)
        out = sequence_logps(model(batch["tokens"]), batch["labels"])
        b = global_batch
        per_example, _, _ = loss_fn(out.logps[:b], out.logps[b:])
        loss = per_example.mean()
        loss.backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        sched.step()
        opt.zero_grad()
        out_losses.append(loss.item())
    return out_losses, norms, model


# ----------------------------------------------------------------------------------------------


def test_sampler_gives_each_step_the_same_pairs_for_any_split():
    """The property the recipe's data order relies on: DistributedSampler (drop_last=True) over
    W ranks with batch_size B yields, per micro-batch, the same union of pairs as one process
    with batch_size W*B -- also when len(dataset) is not a multiple of anything."""
    from torch.utils.data import DataLoader, DistributedSampler

    data = list(range(103))

    def micro_batches(world, bsz, rank):
        s = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=7, drop_last=True)
        s.set_epoch(3)
        return [b.tolist() for b in DataLoader(data, sampler=s, batch_size=bsz, drop_last=True)]

    one = micro_batches(1, 12, 0)
    for world in (2, 3, 4):
        shards = [micro_batches(world, 12 // world, r) for r in range(world)]
        assert all(len(s) == len(one) for s in shards), (world, [len(s) for s in shards], len(one))
        for k, ref in enumerate(one):
            assert sorted(x for s in shards for x in s[k]) == sorted(ref), (world, k)


@pytest.mark.slow
def test_two_processes_give_the_losses_of_one_process(run1, run2):
    (o1, _), (o2, proc2) = run1, run2
    l1, l2 = read_log(o1), read_log(o2)
    a, b = losses(l1), losses(l2)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    diff = max(abs(a[s] - b[s]) for s in a)
    assert diff <= 1e-4, {s: (a[s], b[s]) for s in a}
    ga, gb = losses(l1, "grad_norm"), losses(l2, "grad_norm")
    assert max(abs(ga[s] - gb[s]) for s in ga) <= 1e-4
    assert min(ga.values()) > CLIP  # clipping was active, and gave the same result
    # held-out eval: every pair once on either side (sharded + padded on 2 ranks)
    ea, eb = losses(l1, "eval/loss"), losses(l2, "eval/loss")
    assert sorted(ea) == sorted(eb) == [0, STEPS]
    assert max(abs(ea[s] - eb[s]) for s in ea) <= 1e-4
    assert ea[0] != ea[STEPS]  # the weights moved
    assert all(l2[s]["tokens_per_second_per_device"] > 0 for s in b)
    text = proc2.stdout + proc2.stderr
    assert "global batch 16 pairs = batch_size 4 x gradient_accumulation_steps 2 x world_size 2" in text
    assert "held-out rewards/accuracies" in text and "peak RSS per rank (GiB)" in text


@pytest.mark.slow
def test_two_process_run_matches_a_plain_pytorch_reference(run2, tmp_path):
    """Absolute check of the loss scaling, gradient accumulation, clipping, AdamW and the LR
    schedule under FSDP: the logged losses and gradient norms equal a single-model reference."""
    ref_losses, ref_norms, _ = reference_run(tmp_path, STEPS, global_batch=16, clip=CLIP, total_steps=STEPS)
    log = read_log(run2[0])
    got, got_norms = losses(log), losses(log, "grad_norm")
    for s in range(1, STEPS + 1):
        assert abs(got[s] - ref_losses[s - 1]) <= 1e-4, (s, got[s], ref_losses[s - 1])
        tol = 1e-4 * max(1.0, ref_norms[s - 1])
        assert abs(got_norms[s] - ref_norms[s - 1]) <= tol, (s, got_norms[s], ref_norms[s - 1])


@pytest.mark.slow
def test_resume_mid_epoch_reproduces_the_uninterrupted_run(run2, tmp_path):
    full = run2[0]
    assert (full / "checkpoints" / "step_5" / "COMPLETE").exists()
    assert not list((full / "checkpoints").glob("*.tmp"))
    # the "killed" run: everything after the step-5 resume state is gone
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoints" / "step_5", cut / "checkpoints" / "step_5")
    proc = run(cut, "batch_size=4", *MAIN, "resume_from_checkpoint=True")
    assert "Resumed from" in proc.stdout + proc.stderr
    a, b = losses(read_log(full)), losses(read_log(cut))
    assert sorted(b) == list(range(6, STEPS + 1))
    for s in b:
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
    from safetensors.torch import load_file

    wa = load_file(full / "epoch_0" / "model-00001-of-00001.safetensors")
    wb = load_file(cut / "epoch_0" / "model-00001-of-00001.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)


def _workers(launcher: int) -> dict:
    """{rank: pid} of torchrun's workers: the children of the `tune run` process with RANK set."""
    kids = []
    for task in Path(f"/proc/{launcher}/task").iterdir():
        kids += (task / "children").read_text().split()
    ranks = {}
    for pid in map(int, kids):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        rank = next((e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = pid
    return ranks


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited


@pytest.mark.slow
def test_sigkill_of_one_rank_tears_down_the_job_and_resume_matches_uninterrupted(run2, tmp_path):
    """A real kill: SIGKILL one worker (rank chosen at random) of a 2-process run, at a random
    moment after its first complete resume state. torchrun must stop the other rank and exit
    non-zero; the resumed run must ignore half-written states and end with the weights of the
    uninterrupted run (run2: the same settings)."""
    full = run2[0]
    rng = random.Random()
    out = tmp_path / "killed"
    log = tmp_path / "killed.stderr"
    cmd = tune_command(RECIPE, CONFIG, f"output_dir={out}", "batch_size=4", *MAIN, nproc=2)
    env = tune_env(nproc=2)  # Popen, not tune_run: the test kills a worker while the job runs
    for attempt in range(3):  # the kill must land mid-run; retry with a shorter delay if the run won
        with open(log, "w") as err:
            launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.time() + 300
        while not complete_steps(out) and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0) / (attempt + 1))
        workers = _workers(launcher.pid) if launcher.poll() is None else {}
        victim = rng.choice(sorted(workers)) if len(workers) == 2 else None
        try:
            if victim is None:
                raise ProcessLookupError
            os.kill(workers[victim], signal.SIGKILL)
            t_kill = time.time()
        except ProcessLookupError:
            launcher.kill()
            launcher.wait()
        else:
            try:
                launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                launcher.kill()
                pytest.fail(f"torchrun still running 60 s after rank {victim} was killed")
            if max(complete_steps(out), default=STEPS) < STEPS:
                break
        shutil.rmtree(out, ignore_errors=True)
    else:
        pytest.fail("could not kill a rank before the run finished")
    # torchrun tore the whole job down: non-zero exit, no worker left, the killed rank named
    teardown = time.time() - t_kill
    assert launcher.returncode not in (0, None)
    grace = time.time() + 10
    while any(_alive(p) for p in workers.values()) and time.time() < grace:
        time.sleep(0.1)
    assert not [r for r, p in workers.items() if _alive(p)], "workers left alive after torchrun exited"
    text = log.read_text()
    assert f"Signal 9 (SIGKILL) received by PID {workers[victim]}" in text, text[-3000:]
    assert teardown < 60

    # a kill between COMPLETE and the rename, and a folder without its marker, both newer than
    # the last complete state and both unloadable: resume must pass over them
    last = max(complete_steps(out))
    ckpts = out / "checkpoints"
    for junk, marker in ((ckpts / f"step_{last + 1}.tmp", True), (ckpts / f"step_{last + 2}", False)):
        junk.mkdir(exist_ok=True)
        (junk / ".metadata").write_bytes(b"half-written")
        (junk / "recipe_state.pt").write_bytes(b"half-written")
        if marker:
            (junk / "COMPLETE").write_text("step ?\n")
    proc = run(out, "batch_size=4", *MAIN, "resume_from_checkpoint=True")
    assert f"Resumed from {ckpts / f'step_{last}'} (saved by 2 process(es))" in proc.stdout + proc.stderr
    a, b = losses(read_log(full)), losses(read_log(out))
    for s in range(last + 1, STEPS + 1):
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s], f"rank {victim} killed after step {last}")
    from safetensors.torch import load_file

    wa = load_file(full / "epoch_0" / "model-00001-of-00001.safetensors")
    wb = load_file(out / "epoch_0" / "model-00001-of-00001.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert_close(wb[k], wa[k], atol=1e-6, rtol=0)


def test_resume_ignores_half_written_states(tmp_path):
    """The recipes' choice of the state to resume from (prefopt.resume.latest_complete): the
    newest step_<N> with COMPLETE; not a step_<N>.tmp (even with its marker: killed before the
    rename), nor a step_<N> without one."""
    from prefopt.resume import complete_states, latest_complete

    root = tmp_path / "checkpoints"
    assert latest_complete(root) is None
    for name, complete in (("step_2", True), ("step_10", True), ("step_12.tmp", True), ("step_14", False),
                           ("step_16.tmp", False), ("step_9", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "COMPLETE").write_text("x")
    (root / "step_20").write_text("a file, not a folder")
    assert latest_complete(root) == root / "step_10"  # numeric order: 10 after 9
    assert [p.name for p in complete_states(root)] == ["step_2", "step_9", "step_10"]


@pytest.mark.slow
def test_gathered_hf_checkpoint_loads_in_transformers_with_our_logits(run2):
    """The epoch-end export (gathered on rank 0, HF format) against the training-time weights:
    the final sharded resume state (DCP), loaded into a plain torchtune model."""
    transformers = pytest.importorskip("transformers")
    import torch.distributed.checkpoint as dcp
    from torchtune import config as tt_config

    out = run2[0]
    hf = transformers.LlamaForCausalLM.from_pretrained(out / "epoch_0", torch_dtype=torch.float32).eval()
    cfg = _tiny_cfg()
    model = tt_config.instantiate(cfg.model).eval()
    random_init = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=out / "checkpoints" / f"step_{STEPS}")  # no process group: reads every shard
    model.load_state_dict(state["model"], strict=True)
    assert all(not torch.equal(random_init[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(3, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    # and it is the trained model, not the starting one
    starting = transformers.LlamaForCausalLM.from_pretrained(TINY / "model", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert (starting(ids).logits - theirs).abs().max() > 1e-3


@pytest.mark.slow
def test_activation_checkpointing_and_compile_run_under_two_processes(run2, tmp_path):
    # the padded layout with pad_to_multiple_of=128 (the dataset's max_seq_len): one shape, one
    # compilation (~1 min cold); packed micro-batches vary in rows and length, and every new shape
    # recompiles on CPU. The eager reference (run2) is packed: the layouts are equal (1e-5).
    out = tmp_path / "ac_compile"
    run(out, "batch_size=4", "gradient_accumulation_steps=2", f"clip_grad_norm={CLIP}", "max_steps_per_epoch=2",
        "save_every_n_steps=null", *QUIET, "enable_activation_checkpointing=True", "compile=True",
        "packed=False", "pad_to_multiple_of=128")
    got, ref = losses(read_log(out)), losses(read_log(run2[0]))
    assert sorted(got) == [1, 2]
    # Same pairs and weights at step 1; step 2 follows one update at the schedule's first rate,
    # which does not depend on the run length: the same losses as the eager run.
    for s in got:
        assert abs(got[s] - ref[s]) <= 1e-4, (s, got[s], ref[s])


@pytest.mark.slow
def test_optimizer_in_backward_steps_every_parameter(tmp_path):
    """optimizer_in_bwd: per-parameter AdamW stepped from FSDP's post-reduce hooks must train
    exactly like one AdamW over all parameters (reference: no clipping, same LR schedule)."""
    out = tmp_path / "in_bwd"
    n = 4
    proc = run(out, "batch_size=8", "gradient_accumulation_steps=1", "clip_grad_norm=null", "optimizer_in_bwd=True",
               f"max_steps_per_epoch={n}", "save_every_n_steps=null", *QUIET)
    assert "per-parameter optimizers stepped in backward" in proc.stdout + proc.stderr
    ref_losses, _, ref_model = reference_run(tmp_path, n, global_batch=16, clip=None, total_steps=n)
    got = losses(read_log(out))
    assert sorted(got) == list(range(1, n + 1))
    for s in got:
        assert abs(got[s] - ref_losses[s - 1]) <= 1e-4, (s, got[s], ref_losses[s - 1])
    # the weights after the last step (epoch-end export) equal the reference's
    from torchtune.training import FullModelHFCheckpointer

    trained = FullModelHFCheckpointer(
        checkpoint_dir=str(out / "epoch_0"), checkpoint_files=["model-00001-of-00001.safetensors"],
        model_type="LLAMA2", output_dir=str(tmp_path / "x"),
    ).load_checkpoint()["model"]
    ref_sd = ref_model.state_dict()
    base = _base_model(_tiny_cfg(), tmp_path).state_dict()
    for k, v in trained.items():
        update, ref_update = v - base[k], ref_sd[k] - base[k]
        assert ref_update.norm() > 0 and update.norm() > 0, k  # every parameter was stepped
        # Adam moves each element by ~lr per step (2.4e-4 in all here); float noise can flip the
        # direction of a few elements whose gradient is ~0 (rare vocabulary rows), nothing more.
        diff = (update - ref_update).abs()
        assert diff.norm() <= 1e-2 * ref_update.norm(), k
        assert (diff > 1e-5).float().mean() <= 1e-3, k


@pytest.mark.slow
def test_bf16_with_fp32_master_weights_keeps_small_updates(run2, tmp_path):
    """dtype=bf16 + fp32_master_weights: FSDP2 computes in bf16 but keeps fp32 weights, so a
    SimPO-sized step (lr 1e-6) changes most weights; pure bf16 would round ~99% of them away."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from torchtune import config as tt_config

    out = tmp_path / "mixed"
    proc = run(out, "dtype=bf16", "fp32_master_weights=True", "optimizer.lr=1e-6", "lr_scheduler=null",
               "batch_size=16", "max_steps_per_epoch=2", "save_every_n_steps=null", *QUIET, nproc=0)
    assert "torch.float32 weights, torch.bfloat16 compute" in proc.stdout + proc.stderr
    got, ref = losses(read_log(out)), losses(read_log(run2[0]))
    assert sorted(got) == [1, 2]
    assert abs(got[1] - ref[1]) <= 2e-2 and got[1] != ref[1]  # the same pairs, in bf16
    cfg = _tiny_cfg()
    base = _base_model(cfg, tmp_path).state_dict()
    state = {"model": tt_config.instantiate(cfg.model).state_dict()}
    dcp.load(state, checkpoint_id=out / "checkpoints" / "step_2")
    changed = [(state["model"][k] != base[k]) for k in base]
    assert sum(c.sum().item() for c in changed) / sum(c.numel() for c in changed) > 0.5
    with safe_open(str(out / "epoch_0" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16  # exported in the compute dtype


def test_bad_combinations_rejected_before_anything_is_built(tmp_path):
    """In-process: the recipe's __init__ raises one ConfigError before it creates a process group."""

    import torch.distributed as dist
    from omegaconf import OmegaConf

    from prefopt.config import ConfigError

    recipe = load_recipe("simpo_full_distributed")
    cfg = OmegaConf.merge(
        _tiny_cfg(),
        OmegaConf.from_dotlist([f"output_dir={tmp_path}", "optimizer_in_bwd=True", "gradient_accumulation_steps=2",
                                "fsdp_cpu_offload=True"]),
    )
    with pytest.raises(ConfigError) as e:
        recipe.SimPORecipeDistributed(cfg)
    msg = str(e.value)
    assert msg.startswith("3 problem(s) in the config"), msg
    assert "optimizer_in_bwd: needs gradient_accumulation_steps=1, got 2" in msg
    assert "optimizer_in_bwd: needs clip_grad_norm=null, got 1.0" in msg
    assert "fsdp_cpu_offload: offloads from a GPU to the CPU; needs device=cuda, got device=cpu" in msg
    assert not dist.is_initialized()
    # and a typo is named with the closest key, before the cross-key rules
    typo = OmegaConf.from_dotlist([f"output_dir={tmp_path}", "fsdp_reshard_after_foward=False"])
    with pytest.raises(ConfigError) as e:
        recipe.SimPORecipeDistributed(OmegaConf.merge(_tiny_cfg(), typo))
    assert "fsdp_reshard_after_foward: unknown config key (did you mean 'fsdp_reshard_after_forward'?)" in str(e.value)
    assert not dist.is_initialized()


def test_tiny_config_as_shipped_learns_the_preference_on_two_processes(tmp_path):
    """The README's distributed line (configs/tiny/simpo_full.yaml, 40 steps, no overrides but
    output_dir): held-out reward accuracy from chance to clearly above it."""
    out = tmp_path / "shipped"
    proc = run(out)
    log = read_log(out)
    evals = {s: m for s, m in log.items() if "eval/rewards/accuracies" in m}
    first, last = evals[min(evals)], evals[max(evals)]
    assert min(evals) == 0 and max(evals) == 40
    assert 0.3 <= first["eval/rewards/accuracies"] <= 0.7
    assert last["eval/rewards/accuracies"] >= 0.85  # measured 0.925
    assert last["eval/loss"] < first["eval/loss"] - 0.1
    assert "held-out rewards/accuracies" in proc.stdout + proc.stderr
