"""The training loss of a study, and whether accuracy means anything for it.

``train.loss`` names one of :data:`LOSS_NAMES`; ``auto`` picks cross-entropy for integer labels (classes) and
mean squared error for float targets (regression). Every loss is computed per example (``per_example``:
one value per row, averaged over the target's other dimensions), so a single run, a stacked population
and the chunked evaluation all mean the same number: the batch mean of ``per_example``.

| loss | target | accuracy |
| --- | --- | --- |
| ``cross_entropy`` | int64 class indices ``(N,)`` | ``argmax(out) == y`` |
| ``bce_with_logits`` | floats in [0, 1], ``(N,)`` or ``(N, k)`` | ``(out > 0) == (y > 0.5)``, mean over the k labels |
| ``mse``, ``l1`` | floats ``(N,)`` or ``(N, k)`` | none (NaN in ``Curve.val_acc``) |

An output with as many elements per example as the target is reshaped to it, so a model with one output
unit fits a ``(N,)`` target (the usual regression layout) without broadcasting ``(N, 1)`` against ``(N,)``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from initsearch.errors import ConfigError, DataError

LOSS_NAMES: tuple[str, ...] = ("auto", "cross_entropy", "mse", "l1", "bce_with_logits")


def _like_target(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``out`` reshaped to ``y``'s shape when they hold the same number of values per example."""
    if out.shape != y.shape and out.numel() == y.numel():
        return out.reshape(y.shape)
    return out


def _per_row(values: torch.Tensor) -> torch.Tensor:
    """Element-wise values ``(N, ...)`` averaged to one per example ``(N,)``."""
    return values.reshape(values.shape[0], -1).mean(dim=1)


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _per_row(F.mse_loss(_like_target(out, y), y, reduction="none"))


def _l1(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _per_row(F.l1_loss(_like_target(out, y), y, reduction="none"))


def _bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _per_row(F.binary_cross_entropy_with_logits(_like_target(out, y), y, reduction="none"))


def _class_hits(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(dim=-1) == y).double()


def _label_hits(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _per_row(((_like_target(out, y) > 0) == (y > 0.5)).double())


@dataclass(frozen=True)
class Loss:
    """One training loss: ``per_example(out, y) -> (N,)``, and ``hits(out, y) -> (N,)`` (the fraction of
    each example predicted right) where accuracy means something, else ``None``."""

    name: str
    per_example: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    hits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None

    @property
    def has_accuracy(self) -> bool:
        """Whether accuracy (``val_acc``, ``val_acc_at_budget``, ``steps_to_target``) is defined."""
        return self.hits is not None

    def mean(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch loss a step minimizes: the mean of ``per_example`` (cross-entropy: torch's own fused mean,
        the very number classification studies have always trained on)."""
        if self.name == "cross_entropy":
            return F.cross_entropy(out, y)
        return self.per_example(out, y).mean()

    def total(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The sum of ``per_example`` in float64, for a mean over a whole split evaluated in chunks."""
        if self.name == "cross_entropy":
            return F.cross_entropy(out, y, reduction="sum").double()
        return self.per_example(out, y).double().sum()


LOSSES: dict[str, Loss] = {
    "cross_entropy": Loss("cross_entropy", _cross_entropy, _class_hits),
    "mse": Loss("mse", _mse, None),
    "l1": Loss("l1", _l1, None),
    "bce_with_logits": Loss("bce_with_logits", _bce, _label_hits),
}


def check_loss_name(name: object) -> str:
    """``name`` if it is one of :data:`LOSS_NAMES`, else ConfigError naming ``train.loss``."""
    if name not in LOSS_NAMES:
        raise ConfigError(f"train.loss: must be one of {', '.join(LOSS_NAMES)}, got {name!r}")
    return name  # type: ignore[return-value]


def resolve_loss(name: str, y: torch.Tensor) -> Loss:
    """The loss ``name`` for targets like ``y``; ``auto``: cross-entropy for integer labels, else MSE.

    Refuses (``DataError`` naming ``train.loss``) a pairing that cannot train: float targets with
    cross-entropy, integer targets with a regression loss or BCE, targets that are not numbers.
    """
    check_loss_name(name)
    integer = not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool
    if y.dtype == torch.bool or y.is_complex():
        raise DataError(f"data: targets of dtype {y.dtype} are not supported; use int64 classes or float targets")
    if name == "auto":
        name = "cross_entropy" if integer else "mse"
    if name == "cross_entropy" and not integer:
        raise DataError(f"train.loss: cross_entropy needs integer class labels, but the targets are {y.dtype}; "
                        "use train.loss=mse (or l1, bce_with_logits), or give int64 labels")
    if name == "cross_entropy" and y.dim() != 1:
        raise DataError(f"train.loss: cross_entropy needs one class index per example, got targets of shape "
                        f"{tuple(y.shape)}")
    if name == "cross_entropy" and y.numel() and int(y.min()) < 0:
        raise DataError(f"data: class labels must be 0, 1, 2, ...; got {int(y.min())}")
    if name != "cross_entropy" and integer:
        raise DataError(f"train.loss: {name} needs float targets, but the targets are {y.dtype} (class labels?); "
                        "use train.loss=cross_entropy or auto, or give float targets")
    return LOSSES[name]


def output_size(loss: Loss, y: torch.Tensor) -> int:
    """How many outputs a model needs for targets ``y``: the number of classes for cross-entropy (the
    largest label + 1), else the number of values per example (1 for a ``(N,)`` target)."""
    if loss.name == "cross_entropy":
        return int(y.max().item()) + 1 if y.numel() else 0
    return int(y[0].numel()) if y.dim() > 1 else 1
