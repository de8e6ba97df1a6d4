"""One short training run of a proxy, kept on the device.

The data are tensors already on the device; each step draws a batch by index, and the step's loss is
written into a preallocated device tensor. The host reads the losses once per checkpoint (one sync), checks
for divergence, evaluates on the validation set, and asks the caller (Optuna's pruner) whether to go on.

Batches are drawn **with replacement**: ``torch.randint(0, N, (batch_size,))`` from a ``torch.Generator``
seeded with the run's seed, on the data's device. Runs are short (a few epochs at most), where sampling with
replacement and epoch permutations behave alike, and it keeps every step identical and branch-free.
"""
from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from initsearch.errors import ConfigError, DataError, is_finite_number
from initsearch.proxy.losses import Loss, check_loss_name, resolve_loss
from initsearch.proxy.optimizers import FusedAdam, FusedOptimizer, FusedSGD, fused_kernels_take

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")


class TrainData(Protocol):
    """What ``train_run`` needs from a data object (``data.load_dataset``'s ``Dataset`` is one)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one short run (the ``train`` config group).

    ``optimizer``: ``sgd`` (heavy-ball momentum, not Nesterov), ``adam`` or ``adamw``; for Adam(W)
    ``momentum`` is beta1 (beta2 stays 0.999). ``weight_decay`` applies to every parameter (coupled L2 for
    sgd/adam, decoupled for adamw). ``warmup_steps``: the lr of step ``t`` (1-based) is
    ``lr * t / (warmup_steps + 1)`` for ``t <= warmup_steps``, then ``lr``: it starts near 0 without
    wasting a step at exactly 0. Validation checkpoints at ``eval_every``, ``2 * eval_every``, ... and at
    the last step. A run has diverged when a loss is NaN/inf or the mean loss since the last checkpoint
    exceeds ``divergence_factor`` times the first step's loss. ``bf16`` turns on bf16 autocast on CUDA.
    ``loss``: one of ``losses.LOSS_NAMES`` (``auto``: cross-entropy for integer labels, MSE for float targets).
    """

    steps: int = 200
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int = 0
    eval_every: int = 50
    eval_batch_size: int = 2048
    divergence_factor: float = 10.0
    bf16: bool = False
    loss: str = "auto"

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> TrainConfig:
        """Build from a config mapping (dict or DictConfig), refusing unknown keys, then validate."""
        known = {f.name for f in fields(cls)}
        for key in cfg:
            if key not in known:
                raise ConfigError(f"train.{key}: unknown key; expected one of {', '.join(sorted(known))}")
        config = cls(**{key: cfg[key] for key in cfg})
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ConfigError naming the key of the first bad value."""
        _check_int("train.steps", self.steps, 1)
        _check_int("train.batch_size", self.batch_size, 1)
        _check_int("train.warmup_steps", self.warmup_steps, 0)
        _check_int("train.eval_every", self.eval_every, 1)
        _check_int("train.eval_batch_size", self.eval_batch_size, 1)
        if not is_finite_number(self.lr) or self.lr <= 0:
            raise ConfigError(f"train.lr: must be a finite number > 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer: must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not is_finite_number(self.momentum) or not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"train.momentum: must be in [0, 1), got {self.momentum!r}")
        if not is_finite_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay: must be a finite number >= 0, got {self.weight_decay!r}")
        if not _is_real(self.divergence_factor) or not self.divergence_factor > 1:
            raise ConfigError(f"train.divergence_factor: must be > 1 (inf turns the check off), "
                              f"got {self.divergence_factor!r}")
        if not isinstance(self.bf16, bool):
            raise ConfigError(f"train.bf16: must be true or false, got {self.bf16!r}")
        check_loss_name(self.loss)

    def lr_at(self, step: int) -> float:
        """The learning rate of (1-based) step ``step``: linear warmup, then constant."""
        if step <= self.warmup_steps:
            return self.lr * step / (self.warmup_steps + 1)
        return self.lr


_flushing = 0  # how many subnormals_flushed blocks are open in this process


@contextmanager
def subnormals_flushed() -> Iterator[None]:
    """Flush subnormal floats to zero on the CPU while the block runs; off again when the outermost block ends.

    Tiny gradients and the momentum buffers of units that stopped learning decay into subnormal floats, which
    the CPU handles far slower (docs/performance.md, "Subnormal floats"); as zeros they change no score. The
    study, its selection stage and ``validate`` each train inside such a block (re-entrant: a nested block
    leaves it on), entered from the thread that trains. ``torch.set_flush_denormal`` sets the calling
    thread's floating-point mode and torch has no getter: torch's own intra-op worker threads keep theirs
    (with ``threads`` > 1 they may not flush, and one started inside the block may keep flushing after it).
    """
    global _flushing
    if _flushing == 0:
        torch.set_flush_denormal(True)
    _flushing += 1
    try:
        yield
    finally:
        _flushing -= 1
        if _flushing == 0:
            torch.set_flush_denormal(False)


def _is_real(value: Any) -> bool:
    """An int or float, not a bool, finite or not (``divergence_factor`` may be ``inf``, which turns the check
    off); the other numbers use ``is_finite_number``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: must be an integer >= {minimum}, got {value!r}")


@dataclass
class Curve:
    """What one run produced: the training loss of every step done and the validation checkpoints.

    ``train_loss[i]`` is the loss of step ``i + 1`` (on that step's batch, before the update).
    ``val_steps`` are the steps after which validation ran; ``val_acc`` is NaN at each of them where the
    loss has no accuracy (regression). ``reason`` says why a run ended early.
    """

    train_loss: np.ndarray
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    steps_done: int = 0
    diverged: bool = False
    stopped: bool = False
    reason: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite numbers (NaN, inf) become ``None`` so strict JSON can hold them."""
        out = asdict(self)
        out["train_loss"] = [_finite_or_none(v) for v in np.asarray(self.train_loss, dtype=np.float64)]
        out["val_loss"] = [_finite_or_none(v) for v in self.val_loss]
        out["val_acc"] = [_finite_or_none(v) for v in self.val_acc]
        out["val_steps"] = [int(s) for s in self.val_steps]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Curve:
        """The inverse of ``to_dict`` (``None`` reads back as NaN)."""
        def floats(values: Any) -> list[float]:
            return [math.nan if v is None else float(v) for v in values]

        return cls(train_loss=np.asarray(floats(d["train_loss"]), dtype=np.float64),
                   val_steps=[int(s) for s in d["val_steps"]], val_loss=floats(d["val_loss"]),
                   val_acc=floats(d["val_acc"]), steps_done=int(d["steps_done"]), diverged=bool(d["diverged"]),
                   stopped=bool(d["stopped"]), reason=d.get("reason"), seconds=float(d.get("seconds", 0.0)))


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over all of the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr_at(1)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    betas = (float(cfg.momentum), 0.999)  # torch.optim.Adam refuses an int beta next to a float
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)


def training_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | FusedOptimizer:
    """The optimizer training runs use: ``make_optimizer``'s update made by torch's fused kernel called
    directly (``optimizers``: the same update, bit for bit, without importing ``torch._dynamo``) where the
    kernels take every parameter; otherwise ``make_optimizer``'s, rebuilt ``fused`` where torch can, and
    the plain one for sparse gradients (fused optimizers refuse those at their first step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if _sparse_gradients(model):
        return make_optimizer(model, cfg)
    if not fused_kernels_take(params):
        return fused(make_optimizer(model, cfg))
    lr = cfg.lr_at(1)
    if cfg.optimizer == "sgd":
        return FusedSGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return FusedAdam(params, lr=lr, betas=(float(cfg.momentum), 0.999), weight_decay=cfg.weight_decay,
                     decoupled=cfg.optimizer == "adamw")


def fused(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` rebuilt with ``fused=True`` (one kernel per tensor for the whole update instead of
    several element-wise passes), the same class and hyperparameters, so the same update up to float
    rounding; ``optimizer`` itself where this torch has no fused version for these tensors. The fallback
    of ``training_optimizer`` for tensors its direct kernel calls do not take."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    accepted = inspect.signature(type(optimizer)).parameters  # AdamW's defaults hold a key it does not take
    settings = {key: value for key, value in optimizer.defaults.items() if key in accepted}
    try:
        return type(optimizer)(params, **{**settings, "foreach": None, "fused": True})
    except (RuntimeError, TypeError, ValueError):
        return optimizer


def _sparse_gradients(model: nn.Module) -> bool:
    """Whether some parameter gets a sparse gradient (``nn.Embedding``/``EmbeddingBag`` with
    ``sparse=True``): fused optimizers refuse those at their first step, so such models keep the plain one."""
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse for m in model.modules())


def bf16_autocast(device: torch.device, bf16: bool) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA when asked; a no-op elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, bf16: bool = False,
             loss: Loss | None = None) -> tuple[float, float]:
    """Mean loss and accuracy on ``(x, y)`` in chunks, in eval mode; the model is left in train mode.

    ``loss`` defaults to the one ``train.loss=auto`` picks for ``y``; accuracy is NaN where it has none.
    """
    loss = loss or resolve_loss("auto", y)
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.float64, device=x.device)
    with bf16_autocast(x.device, bf16):
        for start in range(0, len(x), batch_size):
            out = model(x[start:start + batch_size]).float()
            target = y[start:start + batch_size]
            total_loss += loss.total(out, target)
            if loss.hits is not None:
                correct += loss.hits(out, target).sum()
    model.train()
    loss_sum, n_correct = torch.stack([total_loss, correct]).tolist()  # one sync
    return loss_sum / len(x), (n_correct / len(x) if loss.has_accuracy else math.nan)


def divergence_reason(losses: np.ndarray, first_step: int, initial: float, factor: float) -> str | None:
    """Why the losses of steps ``first_step, first_step + 1, ...`` show divergence, or ``None``.

    Diverged when a loss is NaN/inf (the first such step is named), or when their mean exceeds
    ``factor`` times the first step's loss ``initial`` (the checkpoint's step is named).
    """
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        return f"loss is {losses[bad[0]]} at step {first_step + int(bad[0])}"
    mean = float(losses.mean())
    if mean > factor * initial:
        return f"loss {mean:.4g} > {factor:g} x initial {initial:.4g} at step {first_step + len(losses) - 1}"
    return None


def check_data(data: TrainData) -> None:
    """Raise ``DataError`` unless the four splits are tensors and each split's inputs and labels have the
    same, non-zero, number of rows."""
    for name in ("x_train", "y_train", "x_val", "y_val"):
        if not isinstance(getattr(data, name, None), torch.Tensor):
            raise DataError(f"data.{name}: must be a tensor on the device")
    if len(data.x_train) == 0 or len(data.x_train) != len(data.y_train):
        raise DataError(f"data: x_train has {len(data.x_train)} rows and y_train {len(data.y_train)}; "
                        "they must be equal and > 0")
    if len(data.x_val) == 0 or len(data.x_val) != len(data.y_val):
        raise DataError(f"data: x_val has {len(data.x_val)} rows and y_val {len(data.y_val)}; "
                        "they must be equal and > 0")


def _seed_devices(device: torch.device) -> list[int]:
    """The CUDA device indices ``fork_rng`` must save and restore for a run on ``device``."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _seed_global(seed: int, device: torch.device) -> None:
    """Seed the global CPU RNG and, for a CUDA run, the RNG of that one GPU (what dropout draws from)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _to_channels_last(model: nn.Module, x: torch.Tensor) -> bool:
    """On CUDA, image models (4-d inputs) train faster with NHWC ("channels-last") tensors: convert the
    model's 4-d parameters in place and say so, so the loop converts each batch too. Elsewhere nothing
    changes (False): on the CPU the proxies' tiny convolutions gain nothing from it."""
    if x.device.type != "cuda" or x.dim() != 4:
        return False
    model.to(memory_format=torch.channels_last)
    return True


def segment_steps(step: int, cfg: TrainConfig) -> int:
    """Steps from ``step`` (1-based) up to and including the next checkpoint."""
    next_checkpoint = min(cfg.steps, ((step - 1) // cfg.eval_every + 1) * cfg.eval_every)
    return next_checkpoint - step + 1


def draw_batches(gen: torch.Generator, n: int, steps: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """The batch indices of the next ``steps`` steps, ``(steps, batch_size)``: exactly what one
    ``randint(0, n, (batch_size,), generator=gen)`` call per step would draw, in order. On the CPU one call
    draws them all (the CPU generator is sequential, so the values are the same, and the steps save the
    dispatch of their own calls); elsewhere one call per step."""
    if device.type == "cpu":
        return torch.randint(0, n, (steps, batch_size), generator=gen, device=device)
    return torch.stack([torch.randint(0, n, (batch_size,), generator=gen, device=device) for _ in range(steps)])


def train_run(model: nn.Module, data: TrainData, cfg: TrainConfig, *, seed: int,
              on_checkpoint: Callable[[int, Curve], bool] | None = None) -> Curve:
    """Train ``model`` in place for ``cfg.steps`` steps and return its ``Curve``.

    Deterministic on CPU for a given ``seed``: batch indices come from a generator seeded with it (drawn a
    segment at a time, ``draw_batches``), the optimizer is ``training_optimizer``'s, and the
    global RNG (dropout) is seeded with it inside ``torch.random.fork_rng``, so the caller's RNG state is
    untouched. Checkpoints (``_checkpoint``) come at every ``eval_every`` steps and at the last step.
    """
    cfg.validate()
    check_data(data)
    x, y, device = data.x_train, data.y_train, data.x_train.device
    loss_fn = resolve_loss(cfg.loss, y)
    curve = Curve(train_loss=np.zeros(0, dtype=np.float64))
    losses = torch.empty(cfg.steps, dtype=torch.float32, device=device)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=_seed_devices(device)):
        _seed_global(seed, device)
        gen = torch.Generator(device=device).manual_seed(seed)
        channels_last = _to_channels_last(model, x)
        opt = training_optimizer(model, cfg)
        model.train()
        plan, offset = None, 0
        for step in range(1, cfg.steps + 1):
            if step <= cfg.warmup_steps + 1:
                for group in opt.param_groups:
                    group["lr"] = cfg.lr_at(step)
            if plan is None or offset == len(plan):
                plan, offset = draw_batches(gen, len(x), segment_steps(step, cfg), cfg.batch_size, device), 0
            idx = plan[offset]
            offset += 1
            xb = x[idx].contiguous(memory_format=torch.channels_last) if channels_last else x[idx]
            with bf16_autocast(device, cfg.bf16):
                loss = loss_fn.mean(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[step - 1] = loss.detach()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                if _checkpoint(curve, losses, step, model, data, cfg, on_checkpoint, started, loss_fn):
                    break
    curve.seconds = time.perf_counter() - started
    return curve


def _checkpoint(curve: Curve, losses: torch.Tensor, step: int, model: nn.Module, data: TrainData,
                cfg: TrainConfig, on_checkpoint: Callable[[int, Curve], bool] | None, started: float,
                loss_fn: Loss) -> bool:
    """Record the losses since the last checkpoint (the one host sync), then check, evaluate, ask.

    Returns True when the run must end: it diverged (no evaluation then, and no callback), or
    ``on_checkpoint(step, copy_of_curve)`` returned True.
    """
    first = curve.steps_done + 1
    chunk = losses[first - 1:step].double().cpu().numpy()
    curve.train_loss = np.concatenate([curve.train_loss, chunk])
    curve.steps_done = step
    curve.seconds = time.perf_counter() - started
    curve.reason = divergence_reason(chunk, first, float(curve.train_loss[0]), cfg.divergence_factor)
    if curve.reason is not None:
        curve.diverged = True
        return True
    val_loss, val_acc = evaluate(model, data.x_val, data.y_val, cfg.eval_batch_size, cfg.bf16, loss_fn)
    curve.val_steps.append(step)
    curve.val_loss.append(val_loss)
    curve.val_acc.append(val_acc)
    if on_checkpoint is not None and on_checkpoint(step, curve_snapshot(curve)):
        curve.stopped, curve.reason = True, f"stopped by callback at step {step}"
        return True
    return False


def curve_snapshot(curve: Curve) -> Curve:
    """A copy of the curve so far, safe to keep (later checkpoints do not change it)."""
    return Curve(train_loss=curve.train_loss.copy(), val_steps=list(curve.val_steps),
                 val_loss=list(curve.val_loss), val_acc=list(curve.val_acc), steps_done=curve.steps_done,
                 diverged=curve.diverged, stopped=curve.stopped, reason=curve.reason,
                 seconds=curve.seconds)
