"""What a recipe's ``cleanup`` releases at the end of a run (torch-free: cheap to import and test).

A recipe script ends like torchtune's: ``sys.exit(recipe_main())`` after a normal return, so a
caller that runs it as ``__main__`` (a sweep driver, ``runpy``, a notebook's ``%run``, a test)
goes on after it, and `tune run` ends with the interpreter's own exit: non-daemon threads joined
(a ThreadPoolExecutor's idle workers, torch inductor's, told to stop first), ``atexit`` handlers,
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
"""

import gc
import sys
from typing import Any, Iterator

__all__ = ["release_data"]


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
