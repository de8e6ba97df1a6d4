"""SGD, Adam and AdamW as training runs them: torch's own fused update kernels, called directly.

``torch.optim``'s optimizers import ``torch._dynamo`` at their first use (their ``step`` and ``zero_grad``
are wrapped to keep dynamo out), about a second on a laptop CPU: a quarter of a short study's wall time.
The update itself is one ATen kernel per device and dtype (``torch._fused_sgd_``, ``torch._fused_adam_``,
``torch._fused_adamw_``), the one ``torch.optim.SGD/Adam/AdamW(fused=True)`` calls. These classes call it
the way those optimizers do, with the same state (``momentum_buffer``; ``step``, ``exp_avg``,
``exp_avg_sq``), so every update is bit for bit the one of ``torch.optim`` with ``fused=True``
(``tests/test_optimizers.py`` checks it). They keep the parts of the ``Optimizer`` interface training uses:
``param_groups[i]["lr"]`` (warmup writes it), ``state[param]`` (a population moves it when it drops
members), ``defaults`` and ``step()``.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch


class FusedOptimizer:
    """One parameter group and its per-parameter state; ``step`` applies the group's fused kernel."""

    def __init__(self, params: Iterable[torch.Tensor], defaults: dict[str, Any]) -> None:
        self.defaults = {**defaults, "fused": True, "foreach": None}
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")  # torch.optim's words
        self.param_groups: list[dict[str, Any]] = [{**self.defaults, "params": params}]
        self.state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)  # as torch.optim keeps it

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every gradient (only ``set_to_none=True`` is kept: training never zeroes in place)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            self._update(group, [p for p in group["params"] if p.grad is not None])

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        raise NotImplementedError


def fused_kernels_take(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused kernels take these parameters: dense floating-point tensors on the CPU or CUDA
    (what ``torch.optim``'s ``fused=True`` accepts there), with this torch exposing the kernels."""
    return all(hasattr(torch, name) for name in ("_fused_sgd_", "_fused_adam_", "_fused_adamw_")) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        and p.layout == torch.strided for p in params)


def _by_device_and_dtype(params: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by (device, dtype): one fused call serves one such group."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    return list(groups.values())


class FusedSGD(FusedOptimizer):
    """``torch.optim.SGD(params, lr, momentum, weight_decay, fused=True)`` (no dampening, not Nesterov):

    ``g = grad + weight_decay * p``; ``b = g`` at the first step, else ``b = momentum * b + g``;
    ``p -= lr * b`` (``p -= lr * g`` without momentum). Sutskever et al., ICML 2013, in PyTorch's form.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": 0.0, "weight_decay": weight_decay,
                                  "nesterov": False, "maximize": False})

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if not params:
            return
        momentum = group["momentum"]
        buffers = [self.state[p].get("momentum_buffer") if momentum != 0 else None for p in params]
        first_step = momentum != 0 and all(b is None for b in buffers)
        if first_step:  # the kernel copies the gradient in (torch.optim's own first-step buffers)
            buffers = [torch.empty_like(p.grad) for p in params]
        for indices in _by_device_and_dtype(params):
            torch._fused_sgd_(
                [params[i] for i in indices], [params[i].grad for i in indices],
                [] if momentum == 0 else [buffers[i] for i in indices],
                weight_decay=group["weight_decay"], momentum=momentum, lr=group["lr"],
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                is_first_step=first_step, grad_scale=None, found_inf=None)
        if momentum != 0:
            for p, buffer in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buffer


class FusedAdam(FusedOptimizer):
    """``torch.optim.Adam`` (``decoupled=False``) or ``torch.optim.AdamW`` (``decoupled=True``), ``fused=True``.

    Kingma & Ba, ICLR 2015: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g**2``,
    ``p -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)``; the weight decay is added to ``g``
    (Adam) or applied as ``p *= 1 - lr * weight_decay`` first (AdamW; Loshchilov & Hutter, ICLR 2019).
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "amsgrad": False, "maximize": False, "decoupled_weight_decay": decoupled})

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if not params:
            return
        for p in params:
            if not self.state[p]:  # torch.optim's fused state: a float32 step on the parameter's device
                self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        beta1, beta2 = group["betas"]
        for indices in _by_device_and_dtype(params):
            chosen = [params[i] for i in indices]
            steps = [self.state[p]["step"] for p in chosen]
            torch._foreach_add_(steps, 1)
            kernel(chosen, [p.grad for p in chosen], [self.state[p]["exp_avg"] for p in chosen],
                   [self.state[p]["exp_avg_sq"] for p in chosen], [], steps,
                   amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                   eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)
