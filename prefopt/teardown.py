"""How a recipe's run ends: what ``cleanup`` releases, and how a script ends its process
(torch-free: cheap to import and test).

Run through ``runpy`` (``tune run`` on one device, a sweep driver, a notebook's ``%run``, a
test), a recipe returns as torchtune's do (``SystemExit(None)``), the caller goes on, and the
process later ends with the interpreter's own exit: non-daemon threads joined (a
ThreadPoolExecutor's idle workers, torch inductor's, told to stop first), ``atexit`` handlers,
then the native libraries' teardown.

That last step is where native thread pools have been seen to abort a finished process with
"terminate called without an active exception" (apache/arrow#34314, #36980,
huggingface/datasets#7566: Arrow objects and pools destroyed late, while threads still work or
touch Python). pyarrow works in this process through the data sets: their tokens are Arrow
files memory-mapped by ``datasets`` (every rank), and on a cold cache the rank that builds them
parses the JSON Lines with pyarrow's thread pool (those idle workers stay until the process
ends) and writes through pyarrow's jemalloc pool. So ``cleanup`` hands back what the run holds
of pyarrow while every library is fully alive: :func:`release_data` unmaps the token tables and
returns the allocator's free memory, whoever still holds the recipe object afterwards (a
notebook, a test, a traceback).

That made the abort rarer, not impossible: after it, a two-process run of the README's
distributed line still aborted that way once in CI (2026-12-03), after its last save and log
line. So a recipe file that is the process's own main program (``python recipe.py``, or
``python -m recipes.<name>``: what torchrun starts on every rank under ``tune run``) ends a
finished run by :func:`run_script`: Python's own shutdown steps (threads, ``atexit``), then
``os._exit(0)`` before the native libraries' teardown. A program that runs the recipe through
``runpy`` is not the recipe's to end: there it returns as above.
"""

import atexit
import gc
import importlib.util
import io
import os
import sys
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

__all__ = ["is_main_program", "release_data", "run_script"]

# interpreter options that take the next argument as their value
_OPTIONS_WITH_VALUE = {"-X", "-W", "--check-hash-based-pycs"}


def _datasets(obj: Any) -> Iterator[Any]:
    """The data sets under ``obj``: a DataLoader's ``dataset``, the parts of torchtune's
    ``ConcatDataset`` (``_datasets``), or ``obj`` itself."""
    ds = getattr(obj, "dataset", obj)
    parts = getattr(ds, "_datasets", None)
    if isinstance(parts, (list, tuple)):
        for part in parts:
            yield from _datasets(part)
    else:
        yield ds


def release_data(*loaders: Any) -> int:
    """Release the Arrow data behind ``loaders`` (DataLoaders or data sets; None is skipped).

    Each :class:`prefopt.data.PreferenceDataset` is closed (its memory-mapped token table
    dropped; the data set cannot be read afterwards), a garbage collection frees what
    reference cycles still hold (the tables and their memory maps are unmapped there and then),
    and pyarrow's default memory pool hands its unused memory back to the system.

    The caller drops its own references to the loaders too (``self._dataloader = None``): a
    DataLoader keeps its data set. Returns the number of token tables dropped.
    """
    dropped = 0
    for loader in loaders:
        if loader is None:
            continue
        for ds in _datasets(loader):
            if getattr(ds, "_tokens", None) is not None and hasattr(ds, "close"):
                ds.close()
                dropped += 1
    gc.collect()
    pa = sys.modules.get("pyarrow")  # loaded by `datasets`; nothing to release without it
    if pa is not None:
        pa.default_memory_pool().release_unused()
    return dropped


def is_main_program(path: str, argv: Optional[Sequence[str]] = None) -> bool:
    """Whether the interpreter was started to run the file ``path``: ``python [options] path
    [args]`` or ``python [options] -m module [args]`` with ``module``'s file ``path`` (torchrun's
    workers under ``tune run --nproc_per_node``: ``python -u -m recipes.<name>``), read from
    ``argv`` (default ``sys.orig_argv``, the interpreter's own command line). False for
    ``python -c ...`` and any other program (``tune``, a driver) that runs ``path`` itself,
    e.g. through ``runpy``.
    """
    argv = list(sys.orig_argv if argv is None else argv)
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return i + 1 < len(argv) and _module_file(argv[i + 1]) == os.path.realpath(path)
        if arg in ("-c", "-"):
            return False
        if arg == "--":
            i += 1
            break
        if arg in _OPTIONS_WITH_VALUE:
            i += 2
            continue
        if not arg.startswith("-"):
            break
        i += 1
    return i < len(argv) and os.path.realpath(argv[i]) == os.path.realpath(path)


def _module_file(name: str) -> Optional[str]:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return os.path.realpath(spec.origin) if spec is not None and spec.origin else None


def run_script(main: Callable[[], Any], path: str) -> Any:
    """Run a recipe's ``recipe_main`` from its ``if __name__ == "__main__"`` block; used as
    ``sys.exit(run_script(recipe_main, __file__))``.

    When ``path`` is the process's own main program (:func:`is_main_program`) and the run
    finished (``main`` returned, or raised ``SystemExit`` with status 0 or None, as torchtune's
    ``config.parse`` does), the process ends here, as the interpreter would end it up to its
    native teardown: ``threading``'s exit hooks (idle ``ThreadPoolExecutor`` workers told to
    stop) and non-daemon threads joined, ``atexit`` handlers run (logging, metric loggers),
    every open writable file flushed, then ``os._exit(0)``. Otherwise ``main``'s result or
    exception goes to the caller unchanged.
    """
    try:
        result = main()
    except SystemExit as e:
        if e.code not in (None, 0) or not is_main_program(path):
            raise
        result = None
    # CPython's, private: what the interpreter calls at exit; without it (another Python), the
    # interpreter's own ending, as through runpy
    shutdown = getattr(threading, "_shutdown", None)
    if result not in (None, 0) or shutdown is None or not is_main_program(path):
        return result
    _end_process(shutdown)


def _end_process(shutdown: Callable[[], None]) -> None:
    # Py_FinalizeEx's first steps, in its order; then no native teardown (module docstring)
    shutdown()
    atexit._run_exitfuncs()
    for obj in gc.get_objects():  # what finalization would flush when it closes them
        if isinstance(obj, io.IOBase):
            try:
                if not obj.closed and obj.writable():
                    obj.flush()
            except Exception:  # a broken pipe or a detached stream: nothing to save
                pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(0)
