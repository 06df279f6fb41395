"""scripts/onpolicy_demo.sh end to end, cut short: torchtune's own warm-up recipe runs with
configs/tiny/sft_warmup.yaml, one round of on-policy pairs trains with the LoRA recipe, and the
judge writes its report (the full demo: about two and a half minutes on 2 cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.slow
def test_demo_runs_every_step(tmp_path):
    env = dict(os.environ, ROUNDS="1", MIN_GAP="0.0", TUNE=str(Path(sys.executable).with_name("tune")),
               SFT_ARGS="max_steps_per_epoch=30", PAIRS_ARGS="prompts.max_prompts=8 max_new_tokens=24",
               SIMPO_ARGS="epochs=1", JUDGE_ARGS="prompts.max_prompts=4 num_samples=1 max_new_tokens=24")
    proc = subprocess.run(["bash", str(REPO / "scripts/onpolicy_demo.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "sft_warmup/epoch_0/model-00001-of-00001.safetensors").is_file()
    assert (tmp_path / "pairs/pairs.jsonl").read_text().strip()
    report = json.loads((tmp_path / "judge/judge.json").read_text())
    assert set(report["modes"]) == {"greedy", "sampled"}
    assert report["trained"].endswith("simpo_lora/epoch_0")
    assert "win rate (trained > start)" in proc.stdout
