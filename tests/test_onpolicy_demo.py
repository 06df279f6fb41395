"""scripts/onpolicy_demo.sh end to end, cut short: torchtune's own warm-up recipe runs with
configs/tiny/sft_warmup.yaml, one round of on-policy pairs trains with the LoRA recipe, and the
judge writes its report (the full demo: about three minutes on 2 cores)."""

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


FAKE_TUNE = r"""#!/usr/bin/env bash
# stands in for `tune`: the warm-up writes an epoch and a log line; pairs round 0 fails at once,
# every other round writes its pid and sleeps (exec: the sleep is the process the round waits on)
for a in "$@"; do case "$a" in output_dir=*) out="${a#output_dir=}";; esac; done
case "$out" in
  */sft_warmup) mkdir -p "$out/epoch_0" "$out/logs"; echo "Step 1 | loss:1.0" > "$out/logs/log_1.txt";;
  */round_0) sleep 1; echo "round 0: a bad key" >&2; exit 3;;
  */round_*) echo $$ > "$out.pid"; exec sleep 60;;
esac
"""


def test_a_failed_round_stops_the_demo_and_the_rounds_beside_it(tmp_path):
    fake = tmp_path / "tune"
    fake.write_text(FAKE_TUNE)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, TUNE=str(fake), ROUNDS="3", JOBS="2")
    proc = subprocess.run(["bash", str(REPO / "scripts/onpolicy_demo.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode != 0
    # the failed step is named with its log, and the log's last lines are shown
    assert f"pairs round 0 failed; its log: {out}/pairs/round_0.log" in proc.stderr
    assert "round 0: a bad key" in proc.stderr
    # round 1 ran beside round 0 and was stopped with the script (round 2 never started)
    pid = int((out / "pairs/round_1.pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), \
        "round 1 still running after the demo stopped"
    assert not (out / "pairs/round_2.pid").exists()
    assert not (out / "pairs/pairs.jsonl").exists()
