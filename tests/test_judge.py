"""The judge of trained generations: its statistics worked by hand (prefopt.judge), the example
topic reward, the adapter merge, `prefopt plot` of a report, and the recipe end to end on the tiny
model (recipes/judge_generations.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_recipe, recording_compile
from omegaconf import OmegaConf
from torch.testing import assert_close

from prefopt.config import ConfigError
from prefopt.judge import (
    compare,
    degenerate_reasons,
    degenerate_shares,
    format_table,
    length_buckets,
    length_stats,
    percentile,
    win_rate,
)
from prefopt.reward import topic_rule_reward, well_formed

CONFIG = "configs/tiny/judge.yaml"


def close(a, b):
    assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# statistics, by hand


def test_win_rate_counts_ties_half():
    # wins: 1 (3>1), tie (2=2) 0.5, loss (0<5) 0, win (4>-1) 1 -> 2.5 / 4
    close(win_rate([3, 2, 0, 4], [1, 2, 5, -1]), 0.625)
    close(win_rate([1.0], [1.0]), 0.5)
    assert win_rate([], []) is None
    with pytest.raises(ValueError, match="paired"):
        win_rate([1, 2], [1])


def test_percentile_and_length_stats():
    # sorted 1 2 3 4 10: median rank 2 -> 3; p90 rank 3.6 -> 4 + 0.6 * (10 - 4) = 7.6
    close(percentile([10, 1, 3, 2, 4], 50), 3.0)
    close(percentile([10, 1, 3, 2, 4], 90), 7.6)
    close(percentile([5], 90), 5.0)
    s = length_stats([10, 1, 3, 2, 4])
    close([s["mean"], s["median"], s["p90"]], [4.0, 3.0, 7.6])
    # even count: median between 2 and 3; p90 rank 2.7 -> 3 + 0.7 * (4 - 3) = 3.7
    s = length_stats([4, 1, 3, 2])
    close([s["mean"], s["median"], s["p90"]], [2.5, 2.5, 3.7])
    assert length_stats([]) == {"mean": None, "median": None, "p90": None}


def test_length_buckets_split_by_length_difference():
    trained = [2.0, 1.0, 3.0, 1.0, 0.0, 5.0]
    start = [1.0, 1.0, 1.0, 2.0, 1.0, 1.0]
    lt = [10, 10, 20, 12, 30, 5]
    ls = [10, 15, 10, 10, 10, 10]
    # d = 0 (similar, win), -5 (shorter, tie), +10 (longer, win), +2 (similar, loss),
    #     +20 (longer, loss), -5 (shorter, win)
    got = {b["bucket"]: b for b in length_buckets(trained, start, lt, ls, tolerance=2)}
    assert [b for b in got] == ["shorter", "similar", "longer"]
    assert [got[b]["pairs"] for b in got] == [2, 2, 2]
    close([got[b]["win_rate"] for b in got], [0.75, 0.5, 0.5])
    close(got["shorter"]["share"], 2 / 6)
    # tolerance 0: the +2 pair is longer now
    got = {b["bucket"]: b for b in length_buckets(trained, start, lt, ls, tolerance=0)}
    assert [got[b]["pairs"] for b in got] == [2, 1, 3]
    close(got["longer"]["win_rate"], 1 / 3)
    assert got["similar"]["win_rate"] == 1.0
    empty = length_buckets([1.0], [0.0], [5], [5])
    assert [b["win_rate"] for b in empty] == [None, 1.0, None]


def test_degenerate_detection():
    assert degenerate_reasons("The cat sat on the mat.", True) == []
    assert degenerate_reasons("", True) == ["empty"]
    assert degenerate_reasons("  \n", False) == ["empty", "never_stopped"]
    assert degenerate_reasons("The cat sat on the mat.", False) == ["never_stopped"]
    # "hi hi hi" occurs twice in four words (case-insensitive)
    assert degenerate_reasons("Hi hi Hi hi", True) == ["repeated_ngram"]
    assert degenerate_reasons("Hi Hi Hi", True) == []  # one trigram, once
    assert degenerate_reasons("Hi Hi Hi", True, ngram=2) == ["repeated_ngram"]
    assert degenerate_reasons("a b c a b c", True) == ["repeated_ngram"]
    assert degenerate_reasons("a b c a b c", True, max_ngram_repeats=2) == []
    # the sentence the tiny model loops on after collapse
    assert degenerate_reasons("My the station at the station on Sunday.", True, ngram=2) == ["repeated_ngram"]
    shares = degenerate_shares([[], ["empty", "never_stopped"], ["repeated_ngram"], []])
    close([shares[k] for k in ("any", "empty", "never_stopped", "repeated_ngram")], [0.5, 0.25, 0.25, 0.25])
    assert degenerate_shares([])["any"] is None


def test_compare_and_table():
    trained = {"scores": [2.0, 1.0, 0.5], "lengths": [10, 12, 30], "texts": ["A b.", "C d.", "x x x x"],
               "stopped": [True, True, False]}
    start = {"scores": [1.0, 1.0, 1.0], "lengths": [11, 8, 10], "texts": ["E f.", "", "G h."], "stopped": [True, True, True]}
    r = compare(trained, start, length_tolerance=2)
    assert r["pairs"] == 3
    close(r["win_rate"], (1 + 0.5 + 0) / 3)
    close(r["trained"]["mean_reward"], 3.5 / 3)
    close(r["start"]["mean_reward"], 1.0)
    close(r["trained"]["length"]["median"], 12.0)
    close(r["trained"]["degenerate"]["any"], 1 / 3)  # "x x x x": repeated and never stopped
    close(r["start"]["degenerate"]["empty"], 1 / 3)
    got = {b["bucket"]: (b["pairs"], b["win_rate"]) for b in r["length_buckets"]}
    assert got == {"shorter": (0, None), "similar": (1, 1.0), "longer": (2, 0.25)}
    table = format_table({"greedy": r})
    assert "greedy (3 pairs)" in table and "win rate (trained > start)" in table and "0.500" in table
    with pytest.raises(ValueError, match="paired"):
        compare({**trained, "texts": ["a"]}, start)


# ---------------------------------------------------------------------------------------------
# the example reward


def test_topic_rule_reward_pays_for_the_topic_not_for_length():
    fits = "The cat washed the green door in the kitchen on Sunday."  # 11 words; "in the kitchen": the house
    off = "The cat washed the green door at school on Sunday."  # 10 words, no phrase of the house
    assert well_formed(fits) == 1.0
    # form 1, repetition 1, length 1 - 1/11 -> (3 - 1/11) / 3
    close(well_formed(off), (3 - 1 / 11) / 3)
    close(topic_rule_reward("Describe the house in one line.", fits), 2.0)
    close(topic_rule_reward("Describe the house in one line.", off), (3 - 1 / 11) / 3)
    # the same answer fits another topic ("on Sunday": the weekend)
    close(topic_rule_reward("Write one sentence about the weekend.", off), 1 + (3 - 1 / 11) / 3)
    longer = fits[:-1] + " and then the cat washed it again and again and again."
    assert topic_rule_reward("Describe the house in one line.", longer) < 2.0
    assert topic_rule_reward("Describe the house in one line.", "") == 0.0
    # a stutter costs: "door door" is one of 10 bigrams said twice in a row
    close(well_formed("The cat washed the door door in the kitchen on Sunday."), (1 + 0.9 + 1) / 3)
    # custom topics; a prompt naming none scores the form alone
    close(topic_rule_reward("About rivers?", "Fish swim.", topics={"rivers": ["fish"]}, target_words=2), 2.0)
    close(topic_rule_reward("About cars?", "Fish swim.", topics={"rivers": ["fish"]}, target_words=2), 1.0)


# ---------------------------------------------------------------------------------------------
# the recipe


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("judge_generations")


def cfg_for(tmp_path, *overrides):
    base = ["prompts.max_prompts=6", "num_samples=1", "max_new_tokens=6", "batch_size=4", f"output_dir={tmp_path}",
            f"trained_checkpointer.checkpoint_dir={REPO / 'prefopt/assets/tiny/model'}",
            "trained_checkpointer.checkpoint_files=[model.safetensors]"]
    return OmegaConf.merge(OmegaConf.load(REPO / CONFIG), OmegaConf.from_dotlist(base + list(overrides)))


def run(recipe, cfg):
    r = recipe.JudgeRecipe(cfg)
    r.setup(cfg)
    try:
        return r.run()
    finally:
        r.cleanup()


def test_startup_refusals(recipe, tmp_path):
    with pytest.raises(ConfigError, match="set exactly one"):
        recipe.JudgeRecipe(cfg_for(tmp_path, f"adapter={tmp_path / 'config.yaml'}"))
    with pytest.raises(ConfigError, match="nothing to judge"):
        recipe.JudgeRecipe(cfg_for(tmp_path, "greedy=False", "num_samples=0"))
    with pytest.raises(ConfigError, match="adapter: .* is not a file"):
        recipe.JudgeRecipe(cfg_for(tmp_path, "trained_checkpointer=null", f"adapter={tmp_path / 'nope.pt'}"))


def test_same_model_ties_everywhere(recipe, tmp_path):
    """trained == start: the same tokens on both sides, every pair a tie (win rate 0.5)."""
    out = run(recipe, cfg_for(tmp_path))
    for mode in ("greedy", "sampled"):
        r = out["modes"][mode]
        assert r["pairs"] == 6
        assert r["win_rate"] == 0.5
        assert r["trained"] == r["start"]
    report = json.loads((tmp_path / "judge.json").read_text())
    assert report["modes"] == out["modes"]
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["start"] == r["trained"] for r in rows)
    assert "win rate (trained > start)" in (tmp_path / "judge.txt").read_text()
    logged = (next((tmp_path / "logs").glob("log_*.txt"))).read_text()
    assert "judge/greedy/win_rate:0.5" in logged and "judge/sampled/reward_trained:" in logged


def test_adapter_is_merged_into_the_start(recipe, tmp_path):
    """The LoRA recipe's adapter (torchtune format + adapter_config.json) applied to the start:
    a zero lora_b changes nothing; a non-zero one changes the weights by alpha/r * B @ A."""
    from torchtune.training import FullModelHFCheckpointer

    base = FullModelHFCheckpointer(checkpoint_dir=str(REPO / "prefopt/assets/tiny/model"), checkpoint_files=["model.safetensors"],
                                   model_type="LLAMA2", output_dir=str(tmp_path / "x")).load_checkpoint()["model"]
    a = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    b = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "adapter" / "adapter_model.pt"
    path.parent.mkdir()
    torch.save({"layers.0.attn.q_proj.lora_a.weight": a, "layers.0.attn.q_proj.lora_b.weight": b}, path)
    (path.parent / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    merged = recipe.merge_adapter({k: t.clone() for k, t in base.items()}, str(path))  # merged in place
    assert_close(merged["layers.0.attn.q_proj.weight"], base["layers.0.attn.q_proj.weight"] + 2.0 * b @ a)
    assert not any("lora" in k for k in merged)
    torch.save({"layers.9.attn.q_proj.lora_a.weight": a, "layers.9.attn.q_proj.lora_b.weight": b}, path)
    with pytest.raises(ValueError, match="does not have"):
        recipe.merge_adapter(dict(base), str(path))
    # through the recipe: a zero adapter judges the start against itself
    torch.save({"layers.0.attn.q_proj.lora_a.weight": a, "layers.0.attn.q_proj.lora_b.weight": torch.zeros_like(b)}, path)
    out = run(recipe, cfg_for(tmp_path / "run", "trained_checkpointer=null", f"adapter={path}", "num_samples=0"))
    assert out["modes"]["greedy"]["win_rate"] == 0.5 and list(out["modes"]) == ["greedy"]


def test_prefopt_plot_draws_a_judge_report(tmp_path):
    r = compare({"scores": [2.0, 1.0], "lengths": [10, 12], "texts": ["A b.", "C d."], "stopped": [True, True]},
                {"scores": [1.0, 1.0], "lengths": [11, 8], "texts": ["E f.", ""], "stopped": [True, True]})
    (tmp_path / "judge.json").write_text(json.dumps({"modes": {"greedy": r, "sampled": r}, "start": "s", "trained": "t"}))
    png = tmp_path / "judge.png"
    proc = subprocess.run([str(Path(sys.executable).with_name("prefopt")), "plot", str(tmp_path), "-o", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mean reward, response length, win rate, degenerate outputs" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_runs_each_models_decode_steps_compiled(recipe, tmp_path, monkeypatch):
    # torch.compile (a stand-in): one compile per model (start, trained), every one-token step
    # through it over caches of one length, and the generations are the uncompiled run's
    fake_compile, compiled, steps = recording_compile()
    monkeypatch.setattr(recipe.torch, "compile", fake_compile)
    run(recipe, cfg_for(tmp_path / "plain"))
    run(recipe, cfg_for(tmp_path / "compiled", "compile=True"))
    assert len(compiled) == 2 and len(set(steps)) == 1 and len(steps) >= 2 * 5, (len(compiled), set(steps), len(steps))
    plain = (tmp_path / "plain" / "generations.jsonl").read_text()
    assert plain and (tmp_path / "compiled" / "generations.jsonl").read_text() == plain
