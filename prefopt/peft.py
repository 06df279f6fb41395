"""LoRA adapters with float32 master weights under a bf16 base.

Why: at SimPO's learning rates (1e-6 to 1e-5) an Adam step moves a LoRA weight by about the
learning rate, while one bf16 ulp of a typical ``lora_a`` entry (|w| ~ 0.01) is ~6e-5: built in
the model's bf16, most adapter updates round to nothing (measured: after 20 AdamW steps at lr
1e-5 only 17.5% of ``lora_a`` entries had changed at all). torchtune's LoRA recipes build the
adapters in the model dtype. Here the adapter parameters (and so their gradients and the
optimizer state) are float32, and each adapter matmul casts its weight to the activation's dtype
on the fly: the compute stays bf16, every update is kept. The state-dict keys are unchanged.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules.peft import LoRALinear

__all__ = ["keep_adapters_in_fp32"]


def _cast_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # .to() is differentiable: the gradient reaches the float32 weight in float32
    return F.linear(x, module.weight.to(x.dtype))


def keep_adapters_in_fp32(model: nn.Module) -> int:
    """Make every ``LoRALinear``'s ``lora_a``/``lora_b`` weight a float32 parameter that is cast to
    the input's dtype in each forward (in place; the parameters stay the same objects, so
    ``get_adapter_params`` taken before or after sees them).

    Args:
        model (nn.Module): a torchtune LoRA/QLoRA model (any dtype).

    Returns:
        int: the number of adapter weights now held in float32.

    Raises:
        ValueError: for a module this does not handle (DoRA's magnitude vector would stay in
            the model dtype), naming it.
    """
    n = 0
    for name, m in model.named_modules():
        if type(m).__name__ == "DoRALinear":
            raise ValueError(f"{name}: DoRA adapters are not supported by keep_adapters_in_fp32")
        if not isinstance(m, LoRALinear):
            continue
        for sub in (m.lora_a, m.lora_b):
            if sub.bias is not None:  # torchtune's adapters have none; a bias would stay uncast
                raise ValueError(f"{name}: a LoRA adapter with a bias is not supported")
            sub.weight.data = sub.weight.data.float()
            sub.forward = partial(_cast_linear, sub)
            n += 1
    return n
