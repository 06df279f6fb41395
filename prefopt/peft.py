"""LoRA adapters with float32 master weights under a bf16 base.

Why: at SimPO's learning rates (1e-6 to 1e-5) an Adam step moves a LoRA weight by about the
learning rate, while one bf16 ulp of a typical ``lora_a`` entry (|w| ~ 0.01) is ~6e-5: built in
the model's bf16, most adapter updates round to nothing (measured: after 20 AdamW steps at lr
1e-5 only 17.5% of ``lora_a`` entries had changed at all). torchtune's LoRA recipes build the
adapters in the model dtype. Here the adapter parameters (and so their gradients and the
optimizer state) are float32, and each adapter matmul casts its weight to the activation's dtype
on the fly: the compute stays bf16, every update is kept. The state-dict keys are unchanged.

Also :func:`nf4_state_dict_dtype`: the dtype a QLoRA model's NF4 base weights leave its state
dict in, for the epoch export's merge.
"""

import contextlib
from functools import partial
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import common_utils
from torchtune.modules.peft import LoRALinear

__all__ = ["keep_adapters_in_fp32", "nf4_state_dict_dtype"]

# torchtune's state-dict hooks that dequantize NF4 weights (the low-RAM one: where torchtune picks it)
_NF4_HOOKS = (common_utils.reparametrize_as_dtype_state_dict_post_hook,
              common_utils._low_ram_reparametrize_as_dtype_state_dict_post_hook)


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


@contextlib.contextmanager
def nf4_state_dict_dtype(model: nn.Module, dtype: torch.dtype) -> Iterator[int]:
    """Within the block, ``model.state_dict()`` dequantizes the NF4 (QLoRA) base weights to
    ``dtype``; the hooks are restored on leaving. Yields the number of hooks changed (0 for a
    model without NF4 weights: nothing changes).

    Why: torchtune's QLoRA builders register a state-dict hook that dequantizes each NF4 weight
    to a dtype fixed at build time, bf16 for Llama 3 / 3.1 / 3.2 and Qwen 2 (and our Qwen3 /
    Gemma 3 builders, which follow them). The epoch export merges the LoRA delta into those
    weights and saves them: in an fp32 run the merged weights were bf16-rounded, and deltas
    smaller than a bf16 ulp were lost (issue 24 item 4: the export's log-probs 0.065 off the
    trained model's). The trained model computes with ``weight.to(<activation dtype>)``
    (torchao's ``linear_nf4``): dequantized to the run's dtype, the export is that model.
    """
    changed = []
    for module in model.modules():
        for key, hook in module._state_dict_hooks.items():
            if isinstance(hook, partial) and hook.func in _NF4_HOOKS:
                changed.append((module, key, hook))
                module._state_dict_hooks[key] = partial(hook.func, *hook.args, **{**hook.keywords, "dtype": dtype})
    try:
        yield len(changed)
    finally:
        for module, key, hook in changed:
            module._state_dict_hooks[key] = hook
