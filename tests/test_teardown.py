"""prefopt.teardown.run_script / is_main_program: how a recipe script ends its process.

The abort it guards against is native: a library's teardown after Python's own (pyarrow's thread
pools, "terminate called without an active exception"). Here it is made certain with a C-level
``atexit(abort)`` handler (libc runs those in ``exit()``, after the interpreter's finalization):
a program that exits normally then dies of SIGABRT; one ended by ``run_script`` does not."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prefopt.teardown import is_main_program

REPO = Path(__file__).resolve().parents[1]

# what every program below starts with: a native teardown that aborts, a Python atexit handler,
# a ThreadPoolExecutor with an idle worker, a file with buffered output
_PRELUDE = """
import atexit, ctypes, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
libc = ctypes.CDLL(None)
libc.on_exit(ctypes.cast(libc.abort, ctypes.c_void_p), None)
out = open(sys.argv[1], "w")  # buffered; never closed
atexit.register(lambda: out.write("atexit\\n"))
pool = ThreadPoolExecutor(max_workers=1)
pool.submit(time.sleep, 0.01).result()
"""

# a recipe's shape: torchtune's config.parse ends recipe_main with sys.exit(...)
_RECIPE = _PRELUDE + """
from prefopt.teardown import run_script
def recipe_main():
    out.write("run\\n")
    def late():
        time.sleep(0.2)
        out.write("thread\\n")
    threading.Thread(target=late).start()
    sys.exit(EXIT)
if __name__ == "__main__":
    sys.exit(run_script(recipe_main, __file__))
"""


def _run(tmp_path, source: str, *args: str, name: str = "prog.py"):
    prog = tmp_path / name
    prog.write_text(textwrap.dedent(source))
    log = tmp_path / "log.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, *args, str(prog), str(log)], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    return proc, (log.read_text() if log.exists() else "")


def test_the_injected_native_abort_kills_a_normally_ending_program(tmp_path):
    """The premise: without run_script, this finished program dies at its native teardown."""
    proc, log = _run(tmp_path, _PRELUDE + "out.write('run\\n')\n")
    assert proc.returncode == -signal.SIGABRT
    assert log == "run\natexit\n"  # Python's own shutdown had run


def test_a_finished_script_ends_with_status_0_after_threads_atexit_and_flushes(tmp_path):
    proc, log = _run(tmp_path, _RECIPE.replace("EXIT", "None"), "-u")
    assert proc.returncode == 0, proc.stderr
    assert log == "run\nthread\natexit\n"  # its thread joined, then atexit, then the file flushed


def test_a_failed_script_keeps_its_status_and_traceback(tmp_path):
    proc, log = _run(tmp_path, _RECIPE.replace("EXIT", "'bad key: x'"))
    # the interpreter's usual ending (so the injected abort still fires): run_script did not end it
    assert proc.returncode == -signal.SIGABRT
    assert "bad key: x" in proc.stderr
    src = _RECIPE.replace("EXIT", "None").replace("def late", "raise ValueError('broken')\n    def late")
    proc, _ = _run(tmp_path, src)
    assert proc.returncode == -signal.SIGABRT and "ValueError: broken" in proc.stderr


def test_run_through_runpy_the_recipe_returns_to_its_caller(tmp_path):
    """A program that runs the recipe (tune run on one device, a sweep driver) goes on after it."""
    (tmp_path / "recipe.py").write_text(_RECIPE.replace("EXIT", "None").replace(_PRELUDE, _PRELUDE.replace(
        "libc.on_exit(ctypes.cast(libc.abort, ctypes.c_void_p), None)\n", "").replace(
        'out = open(sys.argv[1], "w")', 'out = open(sys.argv[1], "a")')))
    driver = """
    import runpy, sys
    try:
        runpy.run_path(sys.argv[0].replace("prog.py", "recipe.py"), run_name="__main__")
    except SystemExit as e:
        print("recipe exit", e.code)
    print("after the recipe")
    """
    proc, _ = _run(tmp_path, driver)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "recipe exit None\nafter the recipe\n"


@pytest.mark.parametrize("argv, main", [
    (["python", "-u", "recipes/x.py", "--config", "c.yaml"], True),
    (["python", "recipes/x.py"], True),
    (["python", "-X", "faulthandler", "-W", "ignore", "-B", "recipes/x.py", "k=v"], True),
    (["python", "--", "recipes/x.py"], True),
    (["python", "/venv/bin/tune", "run", "recipes/x.py", "--config", "c.yaml"], False),
    (["python", "-m", "torch.distributed.run", "recipes/x.py"], False),
    (["python", "-u", "-m", "recipes.x", "--config", "c.yaml"], True),  # torchrun's workers under tune run
    (["python", "-m", "recipes.y"], False),
    (["python", "-m", "no_such_package.x"], False),
    (["python", "-c", "import runpy", "recipes/x.py"], False),
    (["python", "recipes/y.py", "recipes/x.py"], False),
    (["python"], False),
])
def test_is_main_program(argv, main, tmp_path, monkeypatch):
    for name in ("__init__", "x", "y"):
        (tmp_path / "recipes").mkdir(exist_ok=True)
        (tmp_path / "recipes" / f"{name}.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "recipes" or m.startswith("recipes.")]:
        monkeypatch.delitem(sys.modules, mod)  # our recipes package, imported by other tests
    assert is_main_program("recipes/x.py", argv) is main
    # the same file named another way
    assert is_main_program(str(tmp_path / "recipes" / "x.py"), argv) is main


# loaded by every Python process of a run (PYTHONPATH): in a recipe's own process (a torchrun
# worker, or `python recipe.py`) the native teardown aborts, as pyarrow's has
_SITECUSTOMIZE = """
import ctypes, os, sys
args = sys.orig_argv[1:]
if "RANK" in os.environ or (args and os.path.basename(args[0]).startswith("simpo_")):  # not tune's own
    libc = ctypes.CDLL(None)
    libc.on_exit(ctypes.cast(libc.abort, ctypes.c_void_p), None)
"""

_SMALL = ["max_steps_per_epoch=1", "batch_size=2", "eval_dataset=null", "eval_every_n_steps=null",
          "save_every_n_steps=null"]


@pytest.mark.slow
def test_finished_recipe_processes_end_before_an_aborting_native_teardown(tmp_path):
    """Both training recipes as their process's own program, with a native teardown that aborts:
    the 2-rank torchrun run of the README's distributed line and `python <recipe>` on one
    device exit 0 with their final save and log line (before run_script both died of SIGABRT)."""
    from conftest import tune_command, tune_env

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = tune_env(nproc=2, PYTHONPATH=os.pathsep.join(filter(None, [str(site), str(REPO), os.environ.get("PYTHONPATH")])))
    runs = {
        "torchrun": tune_command("recipes/simpo_full_distributed.py", "configs/tiny/simpo_full.yaml",
                                 f"output_dir={tmp_path / 'full'}", *_SMALL, nproc=2),
        "script": [sys.executable, "recipes/simpo_lora_single_device.py", "--config", "configs/tiny/simpo_lora.yaml",
                   f"output_dir={tmp_path / 'lora'}", *_SMALL],
    }
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{name}: {proc.returncode}\n{proc.stderr[-3000:]}"
        assert "Signal 6" not in proc.stderr and "Aborted" not in proc.stderr
    assert (tmp_path / "full" / "epoch_0" / "model-00001-of-00001.safetensors").is_file()
    assert (tmp_path / "lora" / "epoch_0").is_dir()


def test_without_cpythons_threading_shutdown_the_script_returns(monkeypatch):
    """On a Python without threading._shutdown (private to CPython), a finished run returns and
    the interpreter ends the process its own way: run_script never ends it half-shut."""
    import threading

    from prefopt import teardown

    monkeypatch.setattr(teardown, "is_main_program", lambda path, argv=None: True)
    monkeypatch.delattr(threading, "_shutdown")
    assert teardown.run_script(lambda: None, "recipe.py") is None

    def finished():
        raise SystemExit(None)

    assert teardown.run_script(finished, "recipe.py") is None
