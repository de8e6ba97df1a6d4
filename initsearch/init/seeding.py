"""Seeded, forked random state: the same seed gives the same draws, and the caller's RNG state is left as it was.

Weight initialization draws from torch's global generators (as ``torch.nn.init`` does), so reproducing a
policy's weights means seeding those generators; doing it inside ``torch.random.fork_rng`` restores them
afterwards, so seeding one model does not change what the caller draws next.

* ``forked_seed(seed, cuda_devices)``: the CPU generator and the listed CUDA ones, forked and seeded.
* ``seeded(seed, model)``: the same for the devices ``model``'s parameters live on (``None``: no seeding).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["forked_seed", "seeded"]


@contextlib.contextmanager
def forked_seed(seed: int, cuda_devices: list[int] | tuple[int, ...] = ()) -> Iterator[None]:
    """Within: the CPU generator and those of ``cuda_devices`` seeded with ``int(seed)``; after: all as
    before.

    Only the forked generators are seeded. ``torch.manual_seed`` would also queue a seed for every CUDA,
    XPU and MTIA device (outliving the fork on a machine where CUDA starts later) and, before CUDA starts,
    record a stack trace for each, which costs more than the seeding itself.
    """
    seed = int(seed)  # as torch.manual_seed takes it: numpy integers too
    with torch.random.fork_rng(devices=list(cuda_devices)):
        torch.default_generator.manual_seed(seed)
        for index in cuda_devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@contextlib.contextmanager
def seeded(seed: int | None, model: nn.Module) -> Iterator[None]:
    """Fork the global RNGs (CPU and the model's CUDA devices) and seed them, so the same seed gives the
    same weights and the caller's RNG state is left as it was. A model with parameters on another
    accelerator (MPS, XPU...) is seeded with ``torch.manual_seed``, which seeds those too (their state is not
    forked: ``fork_rng`` only knows CPU and CUDA). ``seed=None``: nothing is seeded or forked."""
    if seed is None:
        yield
        return
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    if any(p.device.type not in ("cpu", "cuda", "meta") for p in model.parameters()):
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(int(seed))
            yield
        return
    with forked_seed(seed, cuda):
        yield
