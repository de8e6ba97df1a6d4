"""Learned-init competitors: GradInit and MetaInit, written from the papers' descriptions.

Both start from a model already initialized by a base scheme and learn one multiplier per tensor; the
learned multipliers are then written into the model in place, and ``learned_policy`` turns them into an
ordinary ``InitPolicy`` (the base scheme per layer with ``scale`` = the multiplier), which reproduces the
same weights on a fresh model built and initialized with the same seed.

**GradInit** (Zhu et al., NeurIPS 2021). A scale ``a_i`` (start 1, kept >= ``min_scale``) multiplies each
weight and each bias tensor of every Linear/Conv/norm layer: ``theta = a * theta0``. Each iteration draws two
batches S1, S2 from ``(x, y)`` (overlapping by half, the authors' default) and takes
``g = d L(S1; theta) / d theta``:

* if ``||g||_p > gamma`` (p = 2 for SGD, p = 1 for Adam, as in the paper: the first Adam step is a sign step,
  whose first-order loss change is ``-eta * ||g||_1``), the objective is ``||g||_p`` (shrink the gradient);
* otherwise it is the loss after one virtual optimizer step, ``L(S2; theta - eta * A[g])``, differentiated
  through ``g`` too (double backward), with ``A[g] = g / ||g||_2`` for SGD (the authors' published runs
  normalize the step; ``normalize_grad=False`` gives the plain ``g``) and ``sign(g)`` for Adam.

The scales are updated with Adam (``lr``), each scale's gradient clipped into [-1, 1], the two kinds of
steps keeping separate Adam moments (as the authors' optimizer does; see ``_ScaleAdam``), then clamped
into ``[min_scale, 100]`` (100 is the largest ``scale`` a policy can hold). BatchNorm runs in train mode
(batch statistics) but its running statistics are restored afterwards; dropout is off. Defaults sized for
the proxies (a few-hundred-step run of a small MLP/CNN): 100 iterations (the paper runs about one epoch,
390 on CIFAR-10), ``lr`` 0.01 (the authors' value for VGG-19 without BatchNorm, our closest case; 0.1 moves
the scales 10x faster on small nets), ``eta`` 0.1, ``gamma`` 1, ``min_scale`` 0.01 (the authors' scripts),
batches of ``min(len(x), 128)`` rows drawn with replacement.

**MetaInit** (Dauphin & Schoenholz, NeurIPS 2019). Only the norms of tensors with >= 2 dimensions (weights;
biases untouched) are tuned, to minimise the gradient quotient of a random batch (inputs N(0, 1) with the
shape of ``x``, labels uniform over the model's outputs, a fresh batch each step, as in the paper)::

    GQ = mean_i | (g_i - (H g)_i) / (g_i + eps * s_i) - 1 |,   s_i = +1 if g_i >= 0 else -1

Each step takes ``d GQ / d norm`` (a third-order derivative: ``H g`` is a Hessian-vector product by double
backward, and GQ is differentiated through it) and moves every norm by sign-SGD with momentum:
``m <- momentum * m - lr * sign(d GQ / d norm)``, ``norm <- norm + m`` (``lr`` in absolute norm units, as in
the paper), kept so the multiplier ``norm / norm0`` stays in ``[min_scale, 100]``. Paper settings: lr 0.1,
momentum 0.9, eps 1e-5, 500 steps; the default here is 100 steps, which on the proxies reaches the plateau of
GQ (a step costs a forward and six backward sweeps; see below).

**Counting passes** (so compute comparisons with a search are fair): ``forward_passes`` counts forward
evaluations of the network; ``backward_passes`` counts backward sweeps, where differentiating through a
gradient sweeps each graph it depends on: a plain gradient is 1, a gradient through a gradient (double
backward) 2, through a Hessian-vector product 3. Per iteration that is: GradInit one-step with SGD 2 forward
/ 4 backward (g: 1; the one-step loss: S2's graph 1 + through g 2), with Adam 2 / 2 (``sign`` has no
derivative, so g is a constant), the gradient-norm branch 2 / 3 (g: 1; ``||g||``: 2; plus one forward of the
one-step loss recorded in ``history``); MetaInit 1 forward / 6 backward (g: 1, H g: 2, d GQ: 3). So
``forward_passes == 2 * iterations`` for GradInit and
``backward_passes == 4 * one_step + 3 * details["gradient_norm_steps"]`` (SGD).

Both functions take the model's input as one tensor, leave ``.grad`` fields, ``requires_grad`` flags, module
modes, buffers and the global RNG state as they were, and change only the scaled parameters' values. Their
random draws come from a ``torch.Generator`` seeded with ``seed`` on the data's device (CPU or CUDA).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from initsearch.contenders.names import LEARNED_BASELINES, learned_method
from initsearch.errors import ConfigError, PolicyError, is_finite_number
from initsearch.init.apply import apply_policy
from initsearch.init.layers import LayerInfo, discover_layers, layer_family
from initsearch.init.policy import MAX_CONSTANT, MAX_POSITIVE, InitPolicy, InitSpec, Rule, load_policy, plan

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MAX_SCALE = MAX_POSITIVE  # the largest multiplier a policy's ``scale`` can hold
GRADINIT_OPTIMIZERS = ("sgd", "adam")
DEFAULT_BATCH = 128
# The base both learned baselines rescale: the study's ``he`` baseline (``BASELINES["he"]`` of the baselines
# module), written out here so that the baselines module can import this one without an import cycle.
HE_BASE: Mapping[str, Any] = {"scheme": "kaiming_normal", "gain": "auto", "mode": "fan_in"}


@dataclass
class LearnedInitResult:
    """What a learned init did.

    ``scales``: the final multiplier of each tuned tensor relative to the base init, keyed by the layer's
    qualified name for its weight and ``"<name>.bias"`` for its bias (a tensor that is not a module's
    ``weight``/``bias`` is keyed by its parameter name). ``forward_passes``/``backward_passes``: see the
    module docstring. ``history``: the objective per iteration (GradInit: the one-step loss
    ``L(S2; theta - eta A[g])`` before that iteration's update; MetaInit: the GQ of that step's random
    batch). ``details``: the settings used and per-method counts (JSON-ready).
    """

    method: str
    scales: dict[str, float]
    forward_passes: int
    backward_passes: int
    history: list[float]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def user_attrs(self) -> dict[str, Any]:
        """Flat, JSON-ready summary for an Optuna trial's user attributes or MLflow params."""
        return {
            "learned_method": self.method,
            "learned_forward_passes": self.forward_passes,
            "learned_backward_passes": self.backward_passes,
            "learned_seconds": round(self.seconds, 4),
            "learned_objective_first": self.history[0] if self.history else None,
            "learned_objective_last": self.history[-1] if self.history else None,
            "learned_scales": dict(self.scales),
        }


# ---- the tensors a method scales ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Target:
    """One tuned tensor: its parameter name (for ``functional_call``), its key in ``scales``, the live
    parameter, and a detached copy of its base value."""

    param_name: str
    key: str
    param: nn.Parameter
    base: torch.Tensor


def _join(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def _gradinit_targets(model: nn.Module) -> list[_Target]:
    """Weight and bias of every Linear/Conv/norm layer (the paper's Conv/Linear/BN; LayerNorm and GroupNorm
    with an affine weight count as norm layers too). A layer shared by several places appears once."""
    targets: list[_Target] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if layer_family(module) is None:
            continue
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None)
            if isinstance(p, nn.Parameter) and id(p) not in seen:
                seen.add(id(p))
                key = name if attr == "weight" else f"{name}.bias"
                targets.append(_Target(_join(name, attr), key, p, p.detach().clone()))
    return targets


def _metainit_targets(model: nn.Module) -> list[_Target]:
    """Every parameter with >= 2 dimensions (the paper's weights); keyed by the module name for a weight."""
    targets: list[_Target] = []
    for pname, p in model.named_parameters():
        if p.dim() >= 2:
            module_name, _, attr = pname.rpartition(".")
            key = module_name if attr == "weight" and module_name else pname
            targets.append(_Target(pname, key, p, p.detach().clone()))
    return targets


# ---- running the model on scaled tensors ---------------------------------------------------------------------
def _is_dropout(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout))


@contextmanager
def _search_mode(model: nn.Module) -> Iterator[None]:
    """Train mode (norm layers use batch statistics) with dropout off; on exit every module's mode and every
    buffer (BatchNorm running statistics) are restored, and the global RNG state is untouched."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.train()
            for m in model.modules():
                if _is_dropout(m):
                    m.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _forward(model: nn.Module, tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The model's output with the given tensors in place of its parameters of those names."""
    return functional_call(model, dict(tensors), (x,))


def _write_scales(targets: Sequence[_Target], scales: Sequence[float]) -> None:
    """Write ``base * scale`` into each parameter, with the same float operation ``apply_policy`` uses for
    a policy's ``scale`` (a copy multiplied in place by a Python float), so the results are bit-identical."""
    with torch.no_grad():
        for t, s in zip(targets, scales):
            new = t.base.clone()
            if s != 1.0:
                new.mul_(s)
            t.param.copy_(new)


def _device_of(model: nn.Module, x: torch.Tensor) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else x.device


# ---- checks ----------------------------------------------------------------------------------------------------
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    return value


def _positive_float(name: str, value: Any, *, upper: float = math.inf) -> float:
    if not is_finite_number(value) or value <= 0 or value > upper:
        high = f"{upper:g}]" if math.isfinite(upper) else "inf)"
        raise ValueError(f"{name}: must be a finite number in (0, {high}, got {value!r}")
    return float(value)


def _check_batch(x: Any, y: Any, need_y: bool) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or len(x) == 0:
        raise ValueError(f"x: must be a non-empty tensor batch, got {type(x).__name__}")
    if need_y and (not isinstance(y, torch.Tensor) or len(y) != len(x)):
        raise ValueError(f"y: must be a tensor with one target per row of x ({len(x)}), got "
                         f"{type(y).__name__}{'' if not isinstance(y, torch.Tensor) else f' of length {len(y)}'}")


# ---- GradInit ------------------------------------------------------------------------------------------------
def _grad_norm(grads: Sequence[torch.Tensor], p: int) -> torch.Tensor:
    """``||g||_p`` of all tensors together (p = 1 or 2), differentiable."""
    if p == 1:
        return torch.stack([g.abs().sum() for g in grads]).sum()
    return torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()


def _stepped(tensors: Mapping[str, torch.Tensor], grads: Sequence[torch.Tensor], eta: float, optimizer: str,
             normalize: bool) -> dict[str, torch.Tensor]:
    """``theta - eta * A[g]``: SGD's first step, ``A[g] = g`` (or ``g / ||g||_2`` with ``normalize``),
    differentiable through g; or Adam's, ``A[g] = sign(g)``, which has zero derivative and is detached."""
    if optimizer == "sgd":
        scale = _grad_norm(grads, 2).clamp_min(1e-30) if normalize else None
        directions = [g / scale if scale is not None else g for g in grads]
    else:
        directions = [torch.sign(g).detach() for g in grads]
    return {name: t - eta * d for (name, t), d in zip(tensors.items(), directions)}


def _gradinit_batches(n: int, batch: int, gen: torch.Generator, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of S1 and S2: three draws (with replacement) ``a``, ``b``, ``c`` of half a batch each;
    ``S1 = a + b`` and ``S2 = a + c``, so the two overlap by half, as the authors' default does (S2 is
    mostly new data, yet the step taken on S1 is judged partly on the rows it was computed from)."""
    half = max(batch // 2, 1)
    rest = max(batch - half, 1)
    a = torch.randint(0, n, (half,), generator=gen, device=device)
    b = torch.randint(0, n, (rest,), generator=gen, device=device)
    c = torch.randint(0, n, (rest,), generator=gen, device=device)
    return torch.cat([a, b]), torch.cat([a, c])


def gradinit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, iterations: int = 100, lr: float = 0.01,
             eta: float = 0.1, gamma: float = 1.0, optimizer: str = "sgd", min_scale: float = 0.01,
             batch_size: int | None = None, normalize_grad: bool = True, seed: int = 0,
             loss_fn: LossFn = F.cross_entropy) -> LearnedInitResult:
    """GradInit on ``model`` in place (see the module docstring); returns the learned scales and costs.

    ``x, y``: the data S1 and S2 are drawn from (batches of ``batch_size`` rows, default
    ``min(len(x), 128)``, overlapping by half; see ``_gradinit_batches``). ``optimizer``: the training
    optimizer the virtual step imitates (``sgd`` or ``adam``; it also picks the gradient norm, l2 or l1).
    ``eta``: the virtual step's size. ``normalize_grad`` (SGD only): step along ``g / ||g||_2``, i.e. a step
    of length ``eta`` whatever the gradient's size, as the authors' published runs do; without it a net
    whose gradient is tiny takes a tiny step and the objective cannot see what a larger scale would give.
    ``gamma``: the bound on the gradient norm. ``lr``: Adam's learning rate on the scales.
    """
    iterations = _positive_int("iterations", iterations)
    lr = _positive_float("lr", lr)
    eta = _positive_float("eta", eta)
    gamma = _positive_float("gamma", gamma)
    min_scale = _positive_float("min_scale", min_scale, upper=1.0)
    if optimizer not in GRADINIT_OPTIMIZERS:
        raise ValueError(f"optimizer: must be one of {', '.join(GRADINIT_OPTIMIZERS)}, got {optimizer!r}")
    _check_batch(x, y, need_y=True)
    batch = min(len(x), DEFAULT_BATCH) if batch_size is None else _positive_int("batch_size", batch_size)
    targets = _gradinit_targets(model)
    if not targets:
        raise ValueError(f"gradinit: {type(model).__name__} has no Linear/Conv/norm layer to scale")
    started = time.perf_counter()
    device = _device_of(model, x)
    x, y = x.to(device), y.to(device)
    p_norm = 2 if optimizer == "sgd" else 1
    alpha = torch.ones(len(targets), device=device)
    adam = _ScaleAdam(len(targets), lr, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    history: list[float] = []
    forward = backward = constrained = 0
    with _search_mode(model):
        for _ in range(iterations):
            s1, s2 = _gradinit_batches(len(x), batch, gen, device)
            a = alpha.clone().requires_grad_(True)
            tensors = {t.param_name: a[i].to(t.base.dtype) * t.base for i, t in enumerate(targets)}
            loss1 = loss_fn(_forward(model, tensors, x[s1]), y[s1])
            grads = torch.autograd.grad(loss1, list(tensors.values()), create_graph=True, allow_unused=True)
            grads = tuple(torch.zeros_like(t) if g is None else g for t, g in zip(tensors.values(), grads))
            forward, backward = forward + 1, backward + 1
            norm = _grad_norm(grads, p_norm)
            violated = float(norm.detach()) > gamma
            if violated:  # the constraint is violated: shrink the gradient
                objective = norm
                with torch.no_grad():  # the one-step loss, for the history only
                    stepped = _stepped({k: v.detach() for k, v in tensors.items()}, [g.detach() for g in grads],
                                       eta, optimizer, normalize_grad)
                    one_step = loss_fn(_forward(model, stepped, x[s2]), y[s2])
                forward, backward, constrained = forward + 1, backward + 2, constrained + 1
            else:
                stepped = _stepped(tensors, grads, eta, optimizer, normalize_grad)
                one_step = loss_fn(_forward(model, stepped, x[s2]), y[s2])
                objective = one_step
                forward, backward = forward + 1, backward + (3 if optimizer == "sgd" else 1)
            history.append(float(one_step.detach()))
            (d_alpha,) = torch.autograd.grad(objective, a)
            alpha = adam.step(alpha, d_alpha, constraint=violated).clamp(min_scale, MAX_SCALE)
    scales = [min(max(v, min_scale), MAX_SCALE) for v in alpha.tolist()]
    _write_scales(targets, scales)
    details = {"iterations": iterations, "lr": lr, "eta": eta, "gamma": gamma, "optimizer": optimizer,
               "min_scale": min_scale, "batch_size": batch, "normalize_grad": normalize_grad, "seed": seed,
               "gradient_norm_steps": constrained, "norm": f"l{p_norm}"}
    return LearnedInitResult("gradinit", {t.key: s for t, s in zip(targets, scales)}, forward, backward, history,
                             time.perf_counter() - started, details)


class _ScaleAdam:
    """Adam on the vector of scales, with the authors' two details: each scale's gradient is clipped into
    [-1, 1] (per dimension), and the gradient-norm steps and the one-step-loss steps keep **separate**
    moment estimates (and step counts), so the huge gradients of a phase that shrinks an exploding net do not
    leave a second moment that freezes the tiny gradients of the phase that follows. Standard Adam otherwise
    (betas 0.9, 0.999, eps 1e-8, bias-corrected)."""

    def __init__(self, size: int, lr: float, device: torch.device,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.state = {kind: [torch.zeros(size, device=device), torch.zeros(size, device=device), 0]
                      for kind in (True, False)}

    def step(self, value: torch.Tensor, grad: torch.Tensor, *, constraint: bool) -> torch.Tensor:
        """The new scales after one step on ``grad`` with the moments of the ``constraint`` phase."""
        b1, b2 = self.betas
        moments = self.state[constraint]
        g = grad.detach().float().clamp(-1.0, 1.0)
        moments[0] = b1 * moments[0] + (1 - b1) * g
        moments[1] = b2 * moments[1] + (1 - b2) * g * g
        moments[2] += 1
        m_hat = moments[0] / (1 - b1 ** moments[2])
        v_hat = moments[1] / (1 - b2 ** moments[2])
        return value - self.lr * m_hat / (v_hat.sqrt() + self.eps)


def one_step_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eta: float = 0.1, optimizer: str = "sgd",
                  normalize_grad: bool = True, batch_size: int | None = None, draws: int = 8, seed: int = 0,
                  loss_fn: LossFn = F.cross_entropy) -> float:
    """GradInit's objective at the model's current weights, for measuring: the mean over ``draws`` batch pairs
    (S1, S2) drawn from ``(x, y)`` as GradInit draws them of ``L(S2; theta - eta * A[g(S1)])``, in GradInit's
    mode (train mode, dropout off). The model is left as it was; costs ``2 * draws`` forward and ``draws``
    backward passes."""
    _check_batch(x, y, need_y=True)
    batch = min(len(x), DEFAULT_BATCH) if batch_size is None else _positive_int("batch_size", batch_size)
    targets = _gradinit_targets(model)
    device = _device_of(model, x)
    x, y = x.to(device), y.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    with _search_mode(model):
        for _ in range(_positive_int("draws", draws)):
            s1, s2 = _gradinit_batches(len(x), batch, gen, device)
            tensors = {t.param_name: t.base.clone().requires_grad_(True) for t in targets}
            loss1 = loss_fn(_forward(model, tensors, x[s1]), y[s1])
            grads = torch.autograd.grad(loss1, list(tensors.values()), allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors.values(), grads)]
            with torch.no_grad():
                stepped = _stepped({k: v.detach() for k, v in tensors.items()}, grads, eta, optimizer, normalize_grad)
                total += float(loss_fn(_forward(model, stepped, x[s2]), y[s2]))
    return total / draws


# ---- MetaInit ------------------------------------------------------------------------------------------------
def gq_tensor(loss: torch.Tensor, tensors: Sequence[torch.Tensor], eps: float = 1e-5, *,
              create_graph: bool = True) -> torch.Tensor:
    """The gradient quotient of ``loss`` over ``tensors`` as a 0-d tensor, differentiable in them when
    ``create_graph`` (the same formula as ``initsearch.init.diagnostics.gradient_quotient``, which measures it
    detached in float64). ``H g`` is the Hessian-vector product with ``v = g``; ``s`` (the sign) is a
    constant. Tensors the loss does not depend on are left out of the mean."""
    grads = torch.autograd.grad(loss, list(tensors), create_graph=True, allow_unused=True)
    pairs = [(t, g) for t, g in zip(tensors, grads) if g is not None]
    if not pairs:
        raise ValueError("gradient quotient: the loss depends on none of the tensors")
    used, g = [t for t, _ in pairs], [g for _, g in pairs]
    hvp = torch.autograd.grad(g, used, grad_outputs=g if create_graph else [gi.detach() for gi in g],
                              create_graph=create_graph, allow_unused=True)
    total, count = None, 0
    for gi, hi in zip(g, hvp):
        hi = torch.zeros_like(gi) if hi is None else hi
        sign = torch.where(gi.detach() >= 0, 1.0, -1.0)
        term = ((gi - hi) / (gi + eps * sign) - 1).abs().sum()
        total = term if total is None else total + term
        count += gi.numel()
    return total / count


def metainit(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, steps: int = 100,
             lr: float = 0.1, momentum: float = 0.9, eps: float = 1e-5, seed: int = 0, min_scale: float = 0.01,
             random_batch: bool = True, loss_fn: LossFn = F.cross_entropy) -> LearnedInitResult:
    """MetaInit on ``model`` in place (see the module docstring); returns the learned scales and costs.

    ``x`` gives the batch's shape, dtype and device: each step draws inputs N(0, 1) of that shape and labels
    uniform over the model's output width (the paper's random data). With ``random_batch=False`` the given
    ``(x, y)`` is used at every step instead (``y`` required). ``min_scale`` bounds each norm from below as a
    fraction of its base norm (the policy format needs scale > 0).
    """
    steps = _positive_int("steps", steps)
    lr = _positive_float("lr", lr)
    if not is_finite_number(momentum) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum: must be in [0, 1), got {momentum!r}")
    eps = _positive_float("eps", eps)
    min_scale = _positive_float("min_scale", min_scale, upper=1.0)
    _check_batch(x, y, need_y=not random_batch)
    if random_batch and not x.is_floating_point():
        raise ValueError(f"x: random inputs need a floating-point batch, got {x.dtype}; pass random_batch=False")
    targets = _metainit_targets(model)
    if not targets:
        raise ValueError(f"metainit: {type(model).__name__} has no parameter with >= 2 dimensions")
    started = time.perf_counter()
    device = _device_of(model, x)
    x = x.to(device)
    y = y.to(device) if y is not None else None
    norms0 = torch.stack([t.base.detach().float().norm() for t in targets])
    if not bool((norms0 > 0).all()):
        zero = [t.key for t, n in zip(targets, norms0.tolist()) if n == 0]
        raise ValueError(f"metainit: tensors with zero norm cannot be rescaled: {zero}")
    scales = torch.ones(len(targets), device=device)
    memory = torch.zeros(len(targets), device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    values: list[torch.Tensor] = []
    with _search_mode(model):
        for _ in range(steps):
            s = scales.clone().requires_grad_(True)
            tensors = {t.param_name: s[i].to(t.base.dtype) * t.base for i, t in enumerate(targets)}
            xb = torch.randn(x.shape, generator=gen, device=device, dtype=x.dtype) if random_batch else x
            out = _forward(model, tensors, xb)
            yb = torch.randint(0, out.shape[1], (len(xb),), generator=gen, device=device) if random_batch else y
            gq = gq_tensor(loss_fn(out, yb), list(tensors.values()), eps)
            (d_scale,) = torch.autograd.grad(gq, s)
            values.append(gq.detach())
            with torch.no_grad():  # sign-SGD with momentum on the norms (d/d norm = d/d scale / norm0)
                memory = momentum * memory - lr * torch.sign(d_scale)
                norms = (scales * norms0 + memory).clamp(min_scale * norms0, MAX_SCALE * norms0)
                scales = norms / norms0
    final = [min(max(v, min_scale), MAX_SCALE) for v in scales.tolist()]
    _write_scales(targets, final)
    details = {"steps": steps, "lr": lr, "momentum": momentum, "eps": eps, "min_scale": min_scale, "seed": seed,
               "batch_size": len(x), "random_batch": random_batch}
    return LearnedInitResult("metainit", {t.key: v for t, v in zip(targets, final)}, steps, 6 * steps,
                             torch.stack(values).tolist(), time.perf_counter() - started, details)


# ---- the result as a policy --------------------------------------------------------------------------------------
def _effective_bias(spec: InitSpec) -> str | float:
    """What a spec does to a bias: ``keep`` scheme with the default ``zeros`` bias leaves it (see apply)."""
    return "keep" if spec.scheme == "keep" and spec.bias == "zeros" else spec.bias


def _scaled_bias(spec: InitSpec, scale: float, layer: str) -> str | float:
    """The spec's bias option after multiplying the bias by ``scale``; ``PolicyError`` where the policy
    format cannot say it (a random or kept bias times a factor other than 1)."""
    option = _effective_bias(spec)
    if scale == 1.0 or option == "zeros" or option == 0.0:
        return spec.bias
    if isinstance(option, float):
        value = option * scale
        if abs(value) > MAX_CONSTANT:
            raise PolicyError(f"{layer}.bias: learned bias {value:g} is outside [-{MAX_CONSTANT:g}, {MAX_CONSTANT:g}]")
        return value
    raise PolicyError(f"{layer}.bias: a {option!r} bias times the learned scale {scale:g} cannot be written as a "
                      "policy; use a base policy whose biases are 'zeros' or a number")


def learned_policy(base: InitPolicy | Mapping[str, Any], result: LearnedInitResult,
                   layers: Sequence[LayerInfo]) -> InitPolicy:
    """The learned init as an ordinary policy: one rule per discovered layer (exact name), the base policy's
    scheme for it with ``scale`` = base scale x learned multiplier, clipped into (0, 100].

    ``layers``: the model's discovered layers (``discover_layers(model, x).layers``). A norm layer gets a rule
    only when its scale changed (norm layers are opt-in; its base ``keep`` times the scale reproduces the
    in-place result). Biases: a ``zeros`` bias stays zero whatever its scale; a numeric one is multiplied; a
    random or kept bias whose scale moved raises ``PolicyError`` (not expressible). Also raises if the base
    uses LSUV (it would undo the scales) or if a tensor was rescaled that no discovered layer owns.
    ``provenance`` records the method, its costs and the base; it holds no timings, so the same seed gives
    the same policy.
    """
    base = load_policy(base)
    if base.lsuv is not None and base.lsuv.enabled:
        raise PolicyError("lsuv: a learned policy's base must not use LSUV (it would rescale the learned weights)")
    rules: list[Rule] = []
    used: set[str] = set()
    for layer, _, spec in plan(base, layers, strict=False):
        w_key, b_key = layer.name, f"{layer.name}.bias"
        used.update((w_key, b_key))
        w_scale, b_scale = result.scales.get(w_key, 1.0), result.scales.get(b_key, 1.0)
        if layer.family == "norm" and spec.scheme == "keep" and w_scale == 1.0 and b_scale == 1.0:
            continue
        scale = min(max(spec.scale * w_scale, math.ulp(0.0)), MAX_SCALE)
        init = replace(spec, scale=scale, bias=_scaled_bias(spec, b_scale, layer.name))
        rules.append(Rule(init=init, layer=layer.name))
    stray = sorted(k for k, v in result.scales.items() if k not in used and v != 1.0)
    if stray:
        raise PolicyError(f"{result.method}: rescaled tensors that are no discovered layer's weight or bias: {stray}")
    provenance = {
        "method": result.method,
        "forward_passes": result.forward_passes,
        "backward_passes": result.backward_passes,
        "objective_first": result.history[0] if result.history else None,
        "objective_last": result.history[-1] if result.history else None,
        "settings": {k: v for k, v in result.details.items() if isinstance(v, (str, int, float, bool))},
        "base": {"rules": [r.to_dict() for r in base.rules], "default": base.default.to_dict()},
    }
    provenance = {k: v for k, v in provenance.items()
                  if v is not None and not (isinstance(v, float) and not math.isfinite(v))}
    return InitPolicy(rules=tuple(rules), default=base.default, lsuv=None, provenance=provenance)


# ---- what the study calls --------------------------------------------------------------------------------------------
def learned_base_policy(name: str) -> InitPolicy:
    """The base init a learned baseline rescales: He init (``kaiming_normal``, gain from the activation,
    fan_in) with zero biases, the study's ``he`` baseline, for both methods.

    GradInit starts from the architecture's own init; the authors' models (VGG, ResNet) initialize their
    convolutions with Kaiming normal and zero biases, so that is the published starting point, and PyTorch's
    ``kaiming_uniform(a=sqrt 5)`` default would hand it a deep ReLU net whose gradients (1e-12 at 32 layers)
    are below Adam's epsilon. MetaInit rescales a given init; it gets the same one so the two learned
    baselines differ from the ``he`` baseline only by the scales they learn. Zero biases make every learned
    scale expressible as a policy (a zero bias is zero at any scale; its GradInit scale has exactly zero
    gradient and stays 1).
    """
    _check_name(name)
    return InitPolicy.from_dict({"format": "initsearch-policy", "version": 1, "rules": [], "default": dict(HE_BASE)})


# The published settings (docs/references.md), where they differ from the defaults sized for the proxies:
# GradInit's authors run about one epoch of CIFAR-10 (390 iterations; eta 0.1, gamma 1, minimum scale 0.01,
# clip 1 and lr 1e-2 for plain nets are the defaults already); MetaInit's listing runs 500 steps (lr 0.1,
# momentum 0.9, eps 1e-5 are the defaults already).
PAPER_SETTINGS: dict[str, dict[str, Any]] = {"gradinit_paper": {"iterations": 390}, "metainit_paper": {"steps": 500}}


def _check_name(name: str) -> None:
    if name not in LEARNED_BASELINES:
        raise ConfigError(f"baselines: unknown learned baseline {name!r}; expected one of {', '.join(LEARNED_BASELINES)}")


def run_learned_baseline(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, *, seed: int,
                         base: InitPolicy | None = None, batch_size: int | None = None,
                         options: Mapping[str, Any] | None = None) -> tuple[InitPolicy, LearnedInitResult]:
    """A learned baseline trial's init: apply ``base`` (default ``learned_base_policy(name)``) with ``seed``,
    run the method in place on ``model``, return the equivalent policy and the result. ``name``: ``gradinit``
    or ``metainit`` (sized for the proxies), or ``gradinit_paper``/``metainit_paper`` (``PAPER_SETTINGS``).

    ``x, y`` on the model's device: for GradInit the data S1/S2 are drawn from (pass the training set);
    MetaInit uses only the shape of ``x[:batch_size]`` (``y`` may be None). ``batch_size``: GradInit's batch
    and MetaInit's random batch (default ``min(len(x), 128)`` for both). ``options``: further keyword
    arguments for ``gradinit``/``metainit`` (e.g. ``{"optimizer": "adam"}`` when training with Adam). The
    returned policy applied with the same seed to a fresh model built the same way gives the same weights.
    """
    _check_name(name)
    base = learned_base_policy(name) if base is None else load_policy(base)
    if base.lsuv is not None and base.lsuv.enabled:
        raise PolicyError("lsuv: a learned policy's base must not use LSUV (it would rescale the learned weights)")
    method = learned_method(name)
    _check_batch(x, y, need_y=method == "gradinit")
    options = {**PAPER_SETTINGS.get(name, {}), **(options or {})}
    apply_policy(model, base, example_batch=x[:DEFAULT_BATCH], seed=seed)
    layers = discover_layers(model, x[:DEFAULT_BATCH]).layers
    if method == "gradinit":
        result = gradinit(model, x, y, seed=seed, batch_size=batch_size, **options)
    else:
        rows = DEFAULT_BATCH if batch_size is None else _positive_int("batch_size", batch_size)
        result = metainit(model, x[:rows], None if y is None else y[:rows], seed=seed, **options)
    return learned_policy(base, result, layers), result
