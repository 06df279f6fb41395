"""benchmarks/gpu_check.py --dry-run: the GPU check's code path, on the CPU, so that the script
a lent GPU runs first cannot rot unseen (~50 s on 2 cores), its varying-length runs included."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_dry_run_gives_every_row_with_numbers(tmp_path):
    from benchmarks.gpu_check import DRY_DECODE_RUNS, DRY_MATRIX, DRY_SCORE_RUNS, DRY_VARYING_MATRIX

    runs = {**DRY_VARYING_MATRIX, **DRY_MATRIX}  # the varying-length runs first, the decoding line last

    out, js = tmp_path / "gpu_check.md", tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "OMP_WAIT_POLICY": "PASSIVE"}
    # --peak-tflops: a CPU has no known peak; with one given, the MFU column is computed too
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--peak-tflops", "1",
           "--out", str(out), "--json", str(js), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    rows = json.loads(js.read_text())["rows"]
    assert [r["name"] for r in rows] == [*runs, *DRY_DECODE_RUNS, *DRY_SCORE_RUNS]
    score = rows[len(runs) + len(DRY_DECODE_RUNS):]
    decode, rows = rows[len(runs):len(runs) + len(DRY_DECODE_RUNS)], rows[:len(runs)]
    # 2 timed prompts x k = 2 responses, the same conversations on both sides: the same scores
    assert all("error" not in r and r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in score), score
    assert score[0]["batched"] and not score[1]["batched"] and score[0]["tokens"] == score[1]["tokens"]
    assert score[0]["scores_head"] == pytest.approx(score[1]["scores_head"], abs=2e-4), score
    for r in decode:  # 2 timed batches of 2 prompts x k = 2 rows x 8 new tokens
        assert "error" not in r, r
        assert r["tokens"] == 2 * 4 * 8 and r["tokens_per_s"] > 0 and r["compiles_while_timed"] == 0, r
    for r in rows:
        assert "error" not in r, r
        assert r["steps"] == 2
        for k in ("median_s", "tokens_per_s", "tflops", "mfu", "flops_per_token"):
            assert isinstance(r[k], float) and r[k] > 0, (r["name"], k, r[k])
        assert r["shape"]["N"] > 0 and r["shape"]["L"] == 2
        assert (r["shape"]["N_adapter"] > 0) == (r["recipe"] == "lora")
        assert "peak_gib" not in r  # CPU: no CUDA allocator to read
        if r["name"] in DRY_VARYING_MATRIX:  # new pairs every step: 5 first steps, then 2
            assert r["varying"] and r["compiles_after_first"] == 0 and "peak_ratio" not in r, r
    assert {(r["recipe"], r["layout"]) for r in rows if r["varying"]} == {("lora", "packed"), ("full", "padded")}

    # the Markdown table: one row per run, numbers in the timing columns, no error text
    lines = out.read_text().splitlines()
    table = [ln for ln in lines if ln.startswith("| ") and not ln.startswith(("| run ", "| varying run "))
             and ln.count("|") == 14]
    assert len(table) == len(runs)
    for ln in table:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        name, step_s, tok_s, peak, tflops, mfu, err = cells[0], cells[6], cells[7], cells[8], cells[9], cells[10], cells[12]
        assert name in runs and err == "", ln
        assert re.fullmatch(r"[0-9.]+", step_s) and re.fullmatch(r"[0-9,]+", tok_s), ln
        assert re.fullmatch(r"[0-9.e+-]+", tflops) and re.fullmatch(r"[0-9.]+ %", mfu), ln
        assert peak == "n/a", ln
    varying = [ln for ln in lines if ln.startswith("| ") and ln.count("|") == 8 and not ln.startswith(("| varying run ", "| decode"))]
    assert [ln.split("|")[1].strip() for ln in varying] == list(DRY_VARYING_MATRIX)
    text = out.read_text()
    for name in DRY_VARYING_MATRIX:
        assert f"compile events after step 5 = 0 for {name}: 0 -> **met**" in text
    assert "MFU ≥ 45% for full_eager_packed:" in text  # the target's arithmetic ran on the stand-in row
    assert "6·N·T + 6·d·V·T_s + 12·L·d·S·T" in text  # the formula is stated
    assert text in proc.stdout  # printed too
    decode_table = [ln for ln in lines if ln.startswith("| decode_")]
    assert [ln.split("|")[1].strip() for ln in decode_table] == list(DRY_DECODE_RUNS)
    assert all(re.fullmatch(r"[0-9,]+", ln.split("|")[3].strip()) for ln in decode_table), decode_table
    score_table = [ln for ln in lines if ln.startswith("| score_")]
    assert [ln.split("|")[1].strip() for ln in score_table] == list(DRY_SCORE_RUNS)
    assert re.search(r"scoring: \*\*[0-9.]+x\*\* one at a time", text)
