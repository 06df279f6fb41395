"""recipes/generate_preference_pairs.py: pairing rules, start-up refusals, a killed run that
continues to the same file, and the pairs file training with the LoRA recipe."""

import json

import pytest
from conftest import REPO, load_recipe, read_log, recording_compile, tune_run
from omegaconf import OmegaConf

from prefopt.config import ConfigError
from prefopt.resume import ResumeMismatchError

CONFIG = "configs/tiny/generate_pairs.yaml"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("generate_preference_pairs")


def cfg_for(tmp_path, *overrides):
    # 12 prompts in batches of 4 (three batches), 8 new tokens: about a second a run
    base = ["prompts.max_prompts=12", "batch_size=4", "max_new_tokens=8", "metric_logger=null", f"output_dir={tmp_path}"]
    return OmegaConf.merge(OmegaConf.load(REPO / CONFIG), OmegaConf.from_dotlist(base + list(overrides)))


def run(recipe, cfg, stop_after=None):
    r = recipe.GeneratePairsRecipe(cfg)
    if stop_after is not None:  # a "kill" right after batch `stop_after` is on disk
        def hook(b):
            if b == stop_after:
                raise KeyboardInterrupt("killed")
        r._on_batch_written = hook
    r.setup(cfg)
    try:
        return r.run()
    finally:
        r.cleanup()


# ---------------------------------------------------------------------------------------------
# pairing


def test_pick_pair(recipe):
    pick = recipe.pick_pair
    assert pick(["a", "b", "c"], [0.5, 2.0, -1.0]) == (1, 2, None)
    assert pick(["a", "b", "c", "d"], [1.0, 3.0, 3.0, 1.0]) == (1, 0, None)  # the first of equal scores, as np.argmax/argmin
    assert pick(["same"] * 4, [1, 2, 3, 4]) == (None, None, "identical samples")
    assert pick(["a", "b"], [1.0, 1.0]) == (None, None, "tied scores")
    assert pick(["a", "b"], [1.0, 1.5], min_score_gap=1.0) == (None, None, "gap below min_score_gap")
    # an empty response never enters a pair (a training pair needs a token on each side) ...
    assert pick(["", "a", "b"], [-5.0, 1.0, 0.0]) == (1, 2, None)
    assert pick(["", " ", "a"], [0.0, 1.0, 2.0]) == (None, None, "empty responses")
    assert pick(["a", "b"], [float("nan"), 1.0]) == (None, None, "non-finite score")


# ---------------------------------------------------------------------------------------------
# start-up refusals


def test_k_below_two_is_refused_naming_the_key(recipe, tmp_path):
    with pytest.raises(ConfigError, match="num_samples: must be >= 2, got 1"):
        recipe.GeneratePairsRecipe(cfg_for(tmp_path, "num_samples=1"))
    assert not (tmp_path / "config.yaml").exists()


def test_prompt_longer_than_the_context_is_refused(recipe, tmp_path):
    cfg = cfg_for(tmp_path, "max_new_tokens=250")
    r = recipe.GeneratePairsRecipe(cfg)
    with pytest.raises(ValueError, match="max_new_tokens: 12 prompt.* max_seq_len=256"):
        r.setup(cfg)
    r.cleanup()


def test_mixed_up_tokenizer_is_refused(recipe, tmp_path):
    cfg = cfg_for(tmp_path, "model.vocab_size=300")  # the tiny tokenizer has 512 ids
    r = recipe.GeneratePairsRecipe(cfg)
    with pytest.raises(ValueError, match="tokenizer: gives token id .* 300 embeddings"):
        r.setup(cfg)
    r.cleanup()


# ---------------------------------------------------------------------------------------------
# written as it goes, resumable, refused from another config


def test_killed_run_continues_to_the_same_file(recipe, tmp_path):
    whole = run(recipe, cfg_for(tmp_path / "whole"))
    assert whole["prompts"] == 12 and whole["pairs_kept"] + sum(whole["prompts_dropped"].values()) == 12

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run(recipe, cfg_for(part), stop_after=1)
    shard = part / "shards" / "rank_0.jsonl"
    assert len(shard.read_text().splitlines()) == 8 and not (part / "pairs.jsonl").exists()
    # a kill in the middle of the next write: half a line at the end of the shard
    with open(shard, "ab") as f:
        f.write(b'{"prompt_index": 8, "prompt": "half a li')
    resumed = run(recipe, cfg_for(part))
    assert resumed["prompts_done_before_this_run"] == 8
    for name in ("pairs.jsonl", "dropped.jsonl"):
        assert (part / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert len(shard.read_text().splitlines()) == 12  # the cut line is gone, no prompt written twice

    rec = json.loads((part / "pairs.jsonl").read_text().splitlines()[0])
    assert rec["chosen"][-1]["role"] == "assistant" and rec["chosen"][:-1] == rec["rejected"][:-1]
    assert len(rec["all_generated_responses"]) == len(rec["all_rm_scores"]) == 4
    assert rec["score_chosen"] == max(rec["all_rm_scores"]) and rec["generated_by"]["top_p"] == 0.95

    # a later batch size (another batch composition) or seed is another config: refused, nothing lost
    before = (part / "pairs.jsonl").read_bytes()
    with pytest.raises(ResumeMismatchError, match="seed=7 in the config but 42"):
        recipe.GeneratePairsRecipe(cfg_for(part, "seed=7"))
    assert (part / "pairs.jsonl").read_bytes() == before


def test_a_retrained_policy_or_edited_reward_is_not_taken_for_finished_work(recipe, tmp_path, monkeypatch):
    # the same config can name a policy written again into the same folder (the next on-policy
    # round) or a scoring function whose code was edited: the earlier pairs are not theirs
    import os
    import shutil

    from conftest import TINY

    policy = tmp_path / "policy"
    shutil.copytree(TINY / "model", policy)
    code = tmp_path / "mods" / "edited_reward.py"
    code.parent.mkdir()
    code.write_text("def score(prompt, response, target_words=12):\n    return float(len(response) % 5)\n")
    monkeypatch.syspath_prepend(str(code.parent))
    out = tmp_path / "out"
    cfg = cfg_for(out, f"checkpointer.checkpoint_dir={policy}", "reward._component_=edited_reward.score")
    run(recipe, cfg)
    pairs = (out / "pairs.jsonl").read_bytes()
    assert run(recipe, cfg)["prompts_done_before_this_run"] == 12  # unchanged: finished work is kept

    weights = policy / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # written again (same size)
    with pytest.raises(ResumeMismatchError, match=r"checkpointer: .*model.safetensors changed \(size or modification time\)"):
        recipe.GeneratePairsRecipe(cfg)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    code.write_text(code.read_text().replace("% 5", "% 3"))
    with pytest.raises(ResumeMismatchError, match="reward: its code changed since the progress was written"):
        recipe.GeneratePairsRecipe(cfg)
    assert (out / "pairs.jsonl").read_bytes() == pairs  # refused: nothing lost
    fresh = run(recipe, OmegaConf.merge(cfg, OmegaConf.from_dotlist(["overwrite_output_dir=True"])))
    assert fresh["prompts_done_before_this_run"] == 0


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_pairs_train_with_the_lora_recipe(tmp_path):
    out = tmp_path / "pairs"
    tune_run("recipes/generate_preference_pairs.py", CONFIG, f"output_dir={out}", "max_new_tokens=16")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs_kept"] > 0
    train = tmp_path / "train"
    tune_run(
        "recipes/simpo_lora_single_device.py", "configs/tiny/simpo_lora.yaml", f"output_dir={train}",
        f"dataset.data_files={out / 'pairs.jsonl'}", "dataset.format=princeton", "eval_dataset=null",
        "eval_every_n_steps=null", "max_steps_per_epoch=2", "batch_size=4", "save_every_n_steps=null",
    )
    assert sorted(read_log(train))[-1] == 2


@pytest.mark.slow
def test_two_ranks_write_one_file_in_prompt_order(tmp_path):
    overrides = ("prompts.max_prompts=12", "batch_size=4", "max_new_tokens=8", "metric_logger=null")
    tune_run("recipes/generate_preference_pairs.py", CONFIG, f"output_dir={tmp_path / 'one'}", *overrides)
    tune_run("recipes/generate_preference_pairs.py", CONFIG, f"output_dir={tmp_path / 'two'}", *overrides, nproc=2)
    assert (tmp_path / "two" / "pairs.jsonl").read_bytes() == (tmp_path / "one" / "pairs.jsonl").read_bytes()
    assert sorted(p.name for p in (tmp_path / "two" / "shards").iterdir()) == ["rank_0.jsonl", "rank_1.jsonl"]


def test_compile_runs_the_decode_steps_through_torch_compile(recipe, tmp_path, monkeypatch):
    # what torch.compile returns (a stand-in; the gpu test below compiles) runs every one-token
    # step, over caches of one length, and the pairs file is the uncompiled run's
    fake_compile, compiled, steps = recording_compile()
    monkeypatch.setattr(recipe.torch, "compile", fake_compile)
    run(recipe, cfg_for(tmp_path / "plain"))
    run(recipe, cfg_for(tmp_path / "compiled", "compile=True"))
    assert len(compiled) == 1 and len(set(steps)) == 1 and len(steps) >= 3 * 7, (len(compiled), set(steps), len(steps))
    assert (tmp_path / "compiled" / "pairs.jsonl").read_bytes() == (tmp_path / "plain" / "pairs.jsonl").read_bytes()


@pytest.mark.gpu
def test_compiled_decode_on_cuda_writes_the_eager_runs_pairs(recipe, tmp_path):
    # fp32, greedy: the compiled decode picks the eager run's tokens (a tiny model's logits are
    # far apart compared to fp32 rounding); every prompt is recorded (greedy samples are the same:
    # each prompt is dropped as identical, its responses kept in dropped.jsonl)
    over = ("device=cuda", "dtype=fp32", "temperature=0.0", "num_samples=2")
    run(recipe, cfg_for(tmp_path / "eager", *over))
    run(recipe, cfg_for(tmp_path / "compiled", *over, "compile=True"))
    eager = [json.loads(x) for x in (tmp_path / "eager" / "dropped.jsonl").read_text().splitlines()]
    comp = [json.loads(x) for x in (tmp_path / "compiled" / "dropped.jsonl").read_text().splitlines()]
    same = sum(a["all_generated_responses"] == b["all_generated_responses"] for a, b in zip(eager, comp))
    assert len(comp) == len(eager) == 12 and same >= 0.9 * len(eager), (same, len(eager))
