"""Reading the metric files that torchtune's ``DiskLogger`` writes (``Step N | k:v k:v ...``)."""

from pathlib import Path
from typing import Dict, List, Union

__all__ = ["read_disk_log", "log_files"]


def log_files(path: Union[str, Path]) -> List[Path]:
    """The DiskLogger files of a run: ``path`` itself if it is a file, else every
    ``log_*.txt`` under ``path`` (a run's output_dir or its logs/ folder), oldest first.

    Raises:
        FileNotFoundError: if ``path`` does not exist or holds no log file.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or directory")
    files = sorted(p.rglob("log_*.txt"), key=lambda f: (f.stat().st_mtime, f.name))
    if not files:
        raise FileNotFoundError(f"{p}: no DiskLogger file (log_*.txt) found")
    return files


def read_disk_log(path: Union[str, Path]) -> Dict[int, Dict[str, float]]:
    """``{step: {metric: value}}`` merged over a run's log files (a resumed run appends a new
    file; later values win). Non-numeric values are skipped.
    """
    steps: Dict[int, Dict[str, float]] = {}
    for f in log_files(path):
        for line in f.read_text().splitlines():
            if not line.startswith("Step "):
                continue
            head, _, rest = line.partition(" | ")
            try:
                step = int(head.split()[1])
            except (IndexError, ValueError):
                continue
            for item in rest.split():
                key, _, value = item.rpartition(":")
                try:
                    steps.setdefault(step, {})[key] = float(value)
                except ValueError:
                    pass
    return steps
