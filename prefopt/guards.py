"""Start-up and run-time guards shared by both recipes: the device, one run at a time per
output_dir, and a training collapse that is finite but learns nothing. (What a resume must match,
and which resume state is intact, is :mod:`prefopt.resume`'s.)

Everything here is torch-distributed free: the recipes decide which rank calls what (rank 0 owns
the output_dir lock; every rank runs the collapse check on reduced values, so every rank decides
the same).
"""

import fcntl
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch

__all__ = [
    "check_device",
    "OutputDirLockedError",
    "lock_output_dir",
    "TrainingCollapseError",
    "CollapseGuard",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# device


def check_device(requested: str) -> torch.device:
    """The ``torch.device`` for the config's ``device``, or an error if this machine lacks it.

    torchtune's ``utils.get_device`` does not check that CUDA exists (a run with ``device: cuda``
    on a CPU-only machine fails later, deep inside the first ``.to()``); this names what was
    requested and what is available, before anything is built.

    Raises:
        RuntimeError: for ``cuda``/``cuda:<i>`` without CUDA (or with fewer devices), ``mps``
            without MPS, or a string torch does not know as a device.
    """
    available = ["cpu"]
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available += [f"cuda:{i}" for i in range(n_cuda)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        available.append("mps")
    try:
        dev = torch.device(requested)
    except RuntimeError as e:
        raise RuntimeError(f"device={requested!r} is not a torch device ({e}); available here: {', '.join(available)}") from e
    missing = None
    if dev.type == "cuda":
        if n_cuda == 0:
            build = f"torch {torch.__version__}, " + (f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build")
            missing = f"CUDA is not available ({build})"
        elif dev.index is not None and dev.index >= n_cuda:
            missing = f"this machine has {n_cuda} CUDA device(s)"
    elif dev.type == "mps" and "mps" not in available:
        missing = "MPS is not available"
    elif dev.type not in ("cpu", "cuda", "mps"):
        missing = f"the recipes run on cpu, cuda or mps, not {dev.type}"
    if missing:
        raise RuntimeError(
            f"device={requested!r} was requested, but {missing}; available here: {', '.join(available)}. "
            "Set device to one of them (e.g. device=cpu)."
        )
    return dev


# ------------------------------------------------------------------------------------------------
# output_dir: one run at a time

LOCK_FILE = ".lock"


class OutputDirLockedError(RuntimeError):
    """Another live process holds ``<output_dir>/.lock``."""


def lock_output_dir(output_dir: Union[str, Path]):
    """Take ``<output_dir>/.lock`` (``fcntl.flock``, exclusive, non-blocking) and write this
    process's PID, host and start time into it; return the open file, which holds the lock until
    it is closed or the process ends (a killed run leaves no stale lock: the kernel drops it).

    ``flock`` locks belong to the open file, so a second call, even in the same process, fails.
    Note: ``flock`` on NFS is emulated with POSIX locks on Linux (works across nodes on NFSv4).

    The name is fixed (every run in the folder must agree on it), so it is opened without
    following a symbolic link (``O_NOFOLLOW``) and written only if it is a regular file with no
    other name (one hard link): a link planted in a shared ``output_dir`` must not make the run
    truncate the file it points to.

    Raises:
        OutputDirLockedError: naming the folder and the holder (PID and host from the file).
        OSError: ``.lock`` is a symbolic link, not a regular file, or has other hard links
            (naming it and what to do), or cannot be opened.
    """
    path = Path(output_dir) / LOCK_FILE
    try:
        # O_NONBLOCK: a FIFO planted under the name must not block the open
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if path.is_symlink():
            raise OSError(
                f"output_dir={str(output_dir)!r}: the lock file {path} is a symbolic link (to {os.readlink(path)}), "
                "not a file a run made; it is not followed. Remove the link (or choose another output_dir)."
            ) from None
        raise OSError(f"output_dir={str(output_dir)!r}: cannot open the lock file {path}: {e}") from e
    st = os.fstat(fd)
    what = ("not a regular file" if not stat.S_ISREG(st.st_mode)
            else f"a name of a file with {st.st_nlink} hard links" if st.st_nlink != 1 else None)
    if what:
        os.close(fd)
        raise OSError(
            f"output_dir={str(output_dir)!r}: the lock file {path} is {what}, not a file a run made; it is "
            "left as it is. Remove it (or choose another output_dir)."
        )
    os.set_blocking(fd, True)
    f = open(fd, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown process"
        f.close()
        raise OutputDirLockedError(
            f"output_dir={str(output_dir)!r} is in use by another run ({holder}; lock file {path}). Two runs in "
            "one output_dir would overwrite each other's checkpoints: wait for it to end, or choose another output_dir."
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


# ------------------------------------------------------------------------------------------------
# collapse: finite numbers, but nothing is learned


class TrainingCollapseError(RuntimeError):
    """The run showed the signs of a collapse for ``collapse_steps`` steps in a row."""


class CollapseGuard:
    """Counts optimizer steps in a row that show a collapse and acts on the ``patience``-th.

    A step is collapsed if any of:

    - the gradient norm is exactly 0 while the learning rate is > 0 (a saturated loss, e.g. a
      hinge loss past its margin for every pair, or frozen/zeroed weights: nothing moves);
    - all ``2b`` average log-probs of the step's chosen and rejected responses are equal (the
      model no longer depends on its input, e.g. weights blown to a constant output);
    - all ``2b`` mean logits are equal (the same, seen in the logits).

    Usage per optimizer step (no host sync of its own: :meth:`spreads` gives device tensors that
    the recipe reads together with the loss it already checks for NaN/inf)::

        guard.observe(chosen, rejected)   # each micro-batch; SequenceLogps halves
        spreads = guard.spreads()         # [2] tensor: max - min of logps, of logits_mean
        ... .tolist() together with the loss and grad norm ...
        guard.check(step, grad_norm=..., lr=..., spreads=(s_logps, s_logits))

    Args:
        patience (int): collapsed steps in a row that trigger (>= 1).
        action (str): ``"error"`` raises :class:`TrainingCollapseError`, ``"warn"`` logs a
            warning (once per streak) and training goes on.
    """

    def __init__(self, patience: int = 3, action: str = "error") -> None:
        if patience < 1:
            raise ValueError(f"collapse_steps must be >= 1, got {patience}")
        if action not in ("error", "warn"):
            raise ValueError(f"on_collapse must be 'error' or 'warn', got {action!r}")
        self.patience, self.action = patience, action
        self.tolerance = 1e-6  # relative spread below which the values count as equal
        self.streak: List[str] = []  # what was seen on each collapsed step of the current streak
        self._first: Optional[int] = None
        self._lo: Optional[torch.Tensor] = None  # [2]: min of (logps, logits_mean) this step
        self._hi: Optional[torch.Tensor] = None

    def observe(self, chosen: Any, rejected: Any) -> None:
        """Fold one micro-batch's ``SequenceLogps`` halves into this step's min/max (device ops)."""
        x = torch.stack(
            [torch.cat([chosen.logps, rejected.logps]).detach().float(),
             torch.cat([chosen.logits_mean, rejected.logits_mean]).detach().float()]
        )  # [2, 2b]
        lo, hi = x.min(dim=1).values, x.max(dim=1).values
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)

    def bounds(self) -> torch.Tensor:
        """``[4]``: (-min logps, -min logits, max logps, max logits) of this step, for an
        all-reduce(MAX) over ranks; then :meth:`spreads_from_bounds`. Resets the step."""
        lo, hi = self._lo, self._hi
        self._lo = self._hi = None
        if lo is None:
            return torch.full((4,), float("nan"))
        return torch.cat([-lo, hi])

    def spreads(self) -> torch.Tensor:
        """``[2]``: max - min over the step's sequences of the log-probs and of the mean logits
        (NaN before any :meth:`observe`). Resets the step."""
        return self.spreads_from_bounds(self.bounds())

    @staticmethod
    def spreads_from_bounds(bounds: torch.Tensor) -> torch.Tensor:
        """Relative spreads ``(max - min) / max(1, |max|, |min|)`` from :meth:`bounds`: equal
        up to float rounding (the mean of the same logits over rows of different lengths) is 0."""
        neg_lo, hi = bounds[:2], bounds[2:]
        scale = torch.maximum(hi.abs(), neg_lo.abs()).clamp(min=1.0)
        return (hi + neg_lo) / scale

    def check(self, step: int, *, grad_norm: Optional[float], lr: float, spreads: Sequence[float]) -> Optional[str]:
        """Count ``step`` (1-based) as collapsed or not; on the ``patience``-th collapsed step in a
        row raise (``action="error"``) or return the warning (``"warn"``, also logged). Host
        floats only. ``grad_norm`` None: not known this step (optimizer in backward)."""
        seen = []
        if grad_norm is not None and grad_norm == 0.0 and lr > 0:
            seen.append(f"gradient norm exactly 0 at lr={lr:g}")
        s_logps, s_logits = (float(s) for s in spreads)
        if s_logps <= self.tolerance:
            seen.append("every chosen and rejected average log-prob equal")
        if s_logits <= self.tolerance:
            seen.append("every chosen and rejected mean logit equal")
        if not seen:
            self.streak, self._first = [], None
            return None
        if not self.streak:
            self._first = step
        self.streak.append(f"step {step}: " + ", ".join(seen))
        if len(self.streak) != self.patience:
            return None
        msg = (
            f"training collapsed: {self.patience} optimizer step(s) in a row (steps {self._first}-{step}) showed "
            f"{'; '.join(self.streak)}. Nothing is being learned (a saturated loss, a learning rate that blew the "
            "weights to a constant output, frozen parameters)"
        )
        if self.action == "error":
            raise TrainingCollapseError(
                msg + f". Stopped before step {step}'s update; resume states written before step {self._first} are "
                "intact. Set on_collapse=warn to train on regardless."
            )
        msg += "; training goes on (on_collapse=warn)"
        log.warning(msg)
        return msg
