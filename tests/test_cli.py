"""The `prefopt` command: ls, cp, run (delegation to tune run), plot."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, read_log

PREFOPT = str(Path(sys.executable).with_name("prefopt"))


def run(*args, cwd=None, check=True):
    proc = subprocess.run([PREFOPT, *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"prefopt {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def test_ls_lists_recipes_and_configs():
    out = run("ls").stdout.splitlines()
    assert out[0].split() == ["RECIPE", "CONFIG"]
    pairs, recipe = [], None
    for line in out[1:]:
        cols = line.split()
        if len(cols) == 2:
            recipe = cols[0]
        pairs.append((recipe, cols[-1]))
    assert ("simpo_lora_single_device", "tiny/simpo_lora") in pairs
    listed = {c for _, c in pairs}
    for cfg in (REPO / "configs").rglob("*.yaml"):
        assert str(cfg.relative_to(REPO / "configs").with_suffix("")) in listed


def test_cp_recipe_and_config(tmp_path):
    run("cp", "simpo_lora_single_device", str(tmp_path))
    assert (tmp_path / "simpo_lora_single_device.py").read_text() == (REPO / "recipes/simpo_lora_single_device.py").read_text()
    run("cp", "tiny/simpo_lora", str(tmp_path / "my.yaml"))
    assert (tmp_path / "my.yaml").read_text() == (REPO / "configs/tiny/simpo_lora.yaml").read_text()
    again = run("cp", "tiny/simpo_lora", str(tmp_path / "my.yaml"), check=False)
    assert again.returncode == 1 and "exists" in again.stderr
    missing = run("cp", "no_such_thing", str(tmp_path), check=False)
    assert missing.returncode == 1 and "no config 'no_such_thing'" in missing.stderr


@pytest.mark.slow
def test_run_delegates_by_name_from_another_directory(tmp_path):
    out = tmp_path / "out"
    run("run", "simpo_lora_single_device", "--config", "tiny/simpo_lora", f"output_dir={out}",
        "max_steps_per_epoch=2", "eval_dataset=null", "eval_every_n_steps=null", "save_every_n_steps=null",
        cwd=tmp_path)
    log = read_log(out)
    assert sorted(s for s in log if "loss" in log[s]) == [1, 2]


@pytest.mark.slow
def test_copied_recipe_runs_with_tune_run_from_any_directory(tmp_path):
    run("cp", "simpo_lora_single_device", str(tmp_path / "my_recipe.py"))
    run("cp", "tiny/simpo_lora", str(tmp_path / "my.yaml"))
    tune = str(Path(sys.executable).with_name("tune"))
    proc = subprocess.run(
        [tune, "run", "my_recipe.py", "--config", "my.yaml", "output_dir=out", "max_steps_per_epoch=2",
         "eval_dataset=null", "eval_every_n_steps=null", "save_every_n_steps=null"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(s for s, m in read_log(tmp_path / "out").items() if "loss" in m) == [1, 2]


def test_plot_writes_png_with_panels(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = []
    for s in range(1, 11):
        lines.append(f"Step {s} | loss:{1.0 - s * 0.05} rewards/accuracies:{0.5 + s * 0.04} rewards/margins:{s * 0.1} "
                     f"logps/chosen:{-2 + s * 0.01} logps/rejected:{-2 - s * 0.05} lr:0.001 ")
    lines.append("Step 0 | eval/loss:1.0 eval/rewards/accuracies:0.5 eval/rewards/margins:0.0 ")
    lines.append("Step 10 | eval/loss:0.6 eval/rewards/accuracies:0.9 eval/rewards/margins:1.0 ")
    (logs / "log_1.txt").write_text("\n".join(lines) + "\n")
    png = tmp_path / "run.png"
    proc = run("plot", str(tmp_path), "-o", str(png))
    assert "loss, rewards/accuracies, rewards/margins, log-probs" in proc.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from PIL import Image

    w, h = Image.open(png).size
    assert (w, h) == (1210, 770)
    empty = run("plot", str(tmp_path / "nowhere"), "-o", str(png), check=False)
    assert empty.returncode == 1 and "no such file" in empty.stderr


def test_run_args_switch_flags_take_no_value():
    """`prefopt run --standalone simpo_full_distributed ...`: --standalone is a torchrun switch,
    the next word is the recipe (it used to be taken as the switch's value)."""
    from prefopt.cli import _split_run_args

    flags, recipe, rest = _split_run_args(
        ["--standalone", "simpo_full_distributed", "--config", "tiny/simpo_full", "batch_size=2"])
    assert (flags, recipe, rest) == (["--standalone"], "simpo_full_distributed", ["--config", "tiny/simpo_full", "batch_size=2"])
    flags, recipe, _ = _split_run_args(["--nproc_per_node", "2", "--standalone", "x.py", "--config", "c"])
    assert flags == ["--nproc_per_node", "2", "--standalone"] and recipe == "x.py"
    flags, recipe, _ = _split_run_args(["--nnodes=2", "r", "--config", "c"])
    assert flags == ["--nnodes=2"] and recipe == "r"


def test_run_unknown_recipe_and_a_config_that_is_not_a_mapping_are_one_line(tmp_path, capsys):
    """`prefopt run` with an unknown recipe, a YAML list, bad YAML: exit 2 and one line naming the
    problem on stderr, no traceback."""
    from prefopt.cli import main

    listed = tmp_path / "list.yaml"
    listed.write_text("- output_dir: /tmp/x\n- batch_size: 4\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: /tmp/x\nbatch_size: [4\n")
    cases = [
        (["run", "simpo_nope", "--config", "tiny/simpo_lora"], "prefopt run: no recipe 'simpo_nope'; known: "),
        (["run", "simpo_lora_single_device", "--config", str(listed)],
         f"prefopt run: {listed}: the config is a YAML list, not a mapping of keys"),
        (["run", "simpo_lora_single_device", "--config", str(bad)], f"prefopt run: {bad}: not valid YAML (line 3, column 1): "),
        (["run", "simpo_lora_single_device", "--config", "tiny/nope"], "prefopt run: no config 'tiny/nope'"),
    ]
    for argv, start in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(start) and err.count("\n") == 1 and "Traceback" not in err, err
