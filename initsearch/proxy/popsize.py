"""How many candidates to train together (``batch_trials=auto``): K from the memory a member needs.

A member of a population costs its parameters four times over (weights, gradients, and the two moment
buffers of Adam; SGD's momentum is one) plus the activations one training step keeps for its backward pass.
``member_bytes`` estimates that without touching the device: the model runs once on the ``meta`` device
(shapes only, no data, no memory) on a batch of the training batch size, and every leaf module's output is
counted twice (kept for the backward pass, and its gradient). ``population_size`` then fits K members in a
fraction (``headroom``) of the free memory, at most ``MAX_K`` (beyond it a round asks the sampler for more
trials than it has seen results; see docs/performance.md).

On CUDA the free memory is ``torch.cuda.mem_get_info``'s. On the CPU memory is not what limits K: there
``auto`` is ``CPU_K`` where the stacked engine runs the model and 1 where it does not (the measured gains are
in docs/performance.md: the vmap engine and the loop are slower than one model at a time there).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from initsearch.proxy.population import choose_mode

MAX_K = 64
CPU_K = 8
BYTES_PER_ELEMENT = 4  # float32 everywhere (bf16 autocast keeps float32 weights and saves less)


def member_bytes(model: nn.Module, input_shape: Sequence[int], batch_size: int, optimizer: str = "adam") -> int:
    """Bytes one member of a population needs on the device for one training step (an estimate, see the
    module docstring): ``(2 + state) x parameters`` plus ``2 x`` the outputs of every leaf module for a
    batch of ``batch_size``, float32. ``state``: 2 for Adam(W), 1 for SGD with momentum."""
    state = 1 if optimizer == "sgd" else 2
    params = sum(p.numel() for p in model.parameters())
    outputs = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal outputs
        if isinstance(output, torch.Tensor):
            outputs += output.numel()

    skeleton = copy.deepcopy(model).to("meta")
    hooks = [m.register_forward_hook(count) for m in skeleton.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            skeleton(torch.empty((batch_size, *input_shape), device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return BYTES_PER_ELEMENT * ((2 + state) * params + 2 * outputs)


def population_size(per_member: int, free_bytes: int, headroom: float = 0.5, cap: int = MAX_K) -> int:
    """The largest K (1 to ``cap``) whose members fit in ``headroom`` of ``free_bytes``."""
    if per_member <= 0:
        return cap
    return max(1, min(cap, math.floor(free_bytes * headroom / per_member)))


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``); ``None`` elsewhere."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def auto_population_size(model: nn.Module, input_shape: Sequence[int], batch_size: int, optimizer: str,
                         device: torch.device, free_bytes: int | None = None) -> int:
    """``batch_trials=auto``: 1 where no engine stacks ``model`` on ``device`` (``auto`` would train it one by
    one anyway); on CUDA the K that fits in half the free memory (``free_bytes``, or measured; 1 where the
    model cannot run on the meta device: without an estimate, one at a time rather than a K that may not
    fit); on the CPU ``CPU_K``."""
    if choose_mode([model, model], "auto", device)[0] == "loop":
        return 1
    free = free_bytes if free_bytes is not None else free_memory(device)
    if free is None:
        return CPU_K
    try:
        per_member = member_bytes(model, input_shape, batch_size, optimizer)
    except Exception:  # a forward that needs real data (``.item()``, data-dependent shapes): no estimate
        return 1
    return population_size(per_member, free)
