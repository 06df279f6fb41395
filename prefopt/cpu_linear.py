"""A model's linear layers run through oneDNN with their weights packed once, while it generates
or scores on CPU.

On CPU, ``F.linear`` hands the dense weight to MKL's GEMM on every call. oneDNN with the weight
reordered once into its own blocked layout (what inductor's freezing pass does for a compiled
model on CPU) computes the same product (fp32: to float rounding) faster at the row counts of
decoding and scoring (``benchmarks/results/generation.md``, "Why oneDNN", has the figures).
Nothing here is used in training: the packed copies do not follow a weight that changes, and the
op has no backward. The copies double the weights' memory while a block lasts, so a model whose
copies would not fit beside what it still needs is left unpacked (logged).
"""

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules.tied_linear import TiedLinear

__all__ = ["onednn_available", "packed_linears", "available_memory_bytes"]

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16)
# the packed copies may take at most this share of the memory available when a block starts: the
# rest is left for what generating needs beside them (KV caches, activations, the reward model)
MAX_SHARE_OF_AVAILABLE = 0.5


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2's "max": no limit


def available_memory_bytes() -> Optional[int]:
    """Bytes of memory this process may still take: the system's ``MemAvailable`` (Linux), or
    less where a cgroup (v2 or v1) limits the container; None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes a huge number for none
            found.append(max(0, limit - usage))
    return min(found) if found else None


def onednn_available() -> bool:
    """oneDNN is built in, enabled (``torch.backends.mkldnn.enabled``) and has the packed-linear ops."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _packable(weight: Optional[torch.Tensor]) -> bool:
    # a plain dense CPU tensor (not an NF4 / DTensor / other subclass, whose product is its own)
    return (isinstance(weight, torch.Tensor) and type(weight.data) is torch.Tensor and weight.device.type == "cpu"
            and weight.dtype in _DTYPES and weight.layout == torch.strided and weight.dim() == 2)


def _packed_forward(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Callable[..., torch.Tensor]:
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    packed_bias = None if bias is None else bias.detach()

    def forward(x: torch.Tensor, *_ignored: torch.Tensor) -> torch.Tensor:
        # (a TiedLinear's inner module is called as (x, weight): the weight is the packed one)
        if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
            # the packed op has no backward: where a gradient may be asked for, the layer's own product
            return F.linear(x, weight, bias)
        if x.dtype != packed.dtype or x.device.type != "cpu":
            raise RuntimeError(f"packed_linears: a {x.dtype} input on {x.device} reached a layer packed for "
                               f"{packed.dtype} on CPU; leave the packed_linears block before moving or casting the model")
        return torch.ops.mkldnn._linear_pointwise(x, packed, packed_bias, "none", [], "")

    return forward


@contextmanager
def packed_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, every plain ``nn.Linear`` of ``model`` (exactly that type: a LoRA or
    quantized layer computes more than its weight, and is left as it is) and a tied output layer
    (torchtune's ``TiedLinear``) whose weight is a dense float32 or bfloat16 CPU tensor computes
    its product with oneDNN on a copy of its weight packed at entry.

    Use it where the weights do not change: generating and scoring. A call with gradients on
    whose input or weight requires a gradient computes the layer's own ``F.linear`` instead (the
    packed op has no backward). The packed copies hold as much memory as the weights they copy,
    until the block ends: when that is over half the memory available at entry
    (:func:`available_memory_bytes`), nothing is packed and a warning says so. Blocks nest: a
    layer an enclosing block packed is left to it (so a recipe can pack once around its loop and a
    library function inside still packs a model given to it alone).

    Args:
        model (nn.Module): any module; layers elsewhere (another device, another dtype) are left.
        enabled (bool): False: nothing is packed (e.g. a ``torch.compile``-d forward, which the
            opaque packed weights would break).

    Yields:
        int: the number of layers packed here (0: disabled, oneDNN unavailable, nothing
        packable, or not enough memory for the copies).

    Raises:
        RuntimeError: inside the block, an input of another dtype or device reaches a packed layer.
    """
    patched: List[Tuple[nn.Module, Callable]] = []
    if enabled and onednn_available():
        layers = [(m, m.weight, m.bias) for m in model.modules()
                  # "forward" already an instance attribute: an enclosing block packed it (or someone patched it)
                  if type(m) is nn.Linear and "forward" not in m.__dict__ and _packable(m.weight)]
        out = getattr(model, "output", None)
        if isinstance(out, TiedLinear) and "forward" not in out.linear.__dict__ and _packable(out.tied_module.weight):
            layers.append((out.linear, out.tied_module.weight, None))
        need = sum(w.numel() * w.element_size() for _, w, _ in layers)
        available = available_memory_bytes() if layers else None
        if available is not None and need > MAX_SHARE_OF_AVAILABLE * available:
            log.warning(
                "packed_linears: not packing %d linear layers for oneDNN: their copies (%.2f GiB) would take "
                "over %d%% of the %.2f GiB of memory available; they run unpacked (slower on CPU, no extra memory)",
                len(layers), need / 2**30, int(100 * MAX_SHARE_OF_AVAILABLE), available / 2**30)
            layers = []
        try:
            patched = [(m, _packed_forward(w, b)) for m, w, b in layers]
        except RuntimeError:
            # a oneDNN build without these kernels for this CPU (the ops exist in every build):
            # the layers' own product, as without the block
            patched = []
    for m, fwd in patched:
        m.forward = fwd  # an instance attribute shadows the class's forward
    try:
        yield len(patched)
    finally:
        for m, _ in patched:
            del m.forward
