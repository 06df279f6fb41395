"""How a recipe script ends its process (torch-free, so that it is cheap to import and test)."""

import atexit
import os
import sys
import threading
from typing import Any, Callable

__all__ = ["run_and_exit"]


def run_and_exit(main: Callable[[], Any]) -> None:
    """Run a recipe's ``recipe_main`` as a script, then end the process without the
    interpreter's teardown: exit status 0 after a finished run, the usual traceback and status
    on an error (``main`` raising, or ``SystemExit`` with a non-zero code).

    Why: native thread pools torn down after Python's own teardown (pyarrow's, under the
    memory-mapped ``datasets`` files the data sets live in) sometimes abort the process at that
    point with "terminate called without an active exception" (apache/arrow#34314, #36980,
    huggingface/datasets#7566). We saw it about once in 50 two-process runs, always after
    every step, save and log line was written, which made a finished run exit with a failure.
    So after a finished run: non-daemon threads are joined and ``atexit`` handlers run
    (logging, metric loggers), the standard streams are flushed, then ``os._exit(0)``.
    """
    try:
        main()
    except SystemExit as e:  # torchtune's config.parse ends with sys.exit(recipe_main(cfg))
        if e.code not in (None, 0):
            raise
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
