"""A user's own data: ``data._target_=pkg.mod.function`` (or ``initsearch.search(model, (train, val))``).

The function (called with the ``+data.KEY=VALUE`` arguments) returns ``(train, val)``; each split is a tuple
of tensors ``(x, y)`` (anything ``torch.as_tensor`` takes: numpy arrays too) or a map-style
``torch.utils.data.Dataset`` of ``(x, y)`` pairs. Both are read **once** into tensors on the study's device,
as the built-in datasets are, so every step is an index slice. Nothing is unpickled or executed but the
function the user named.

Inputs keep their dtype class: floating inputs become float32 (standardized per channel, dim 1, with the
training split's statistics when ``data.normalize`` is on), integer inputs (token ids) stay int64 and are
never normalized. Targets: integer labels become int64 (classes), floating targets float32 (regression or
multi-label). Every problem is one :class:`~initsearch.errors.DataError` naming the key, before any trial.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from initsearch.errors import DataError, first_line
from initsearch.proxy.data import Dataset, normalize_dataset, subset_indices
from initsearch.proxy.losses import output_size, resolve_loss
from initsearch.proxy.models import locate

MAX_BYTES_FRACTION = 0.5  # data.max_bytes: null -> this fraction of the device's free memory
SPLITS = ("train", "val")


def load_user_data(
    source: str | Callable[..., Any] | tuple[Any, Any],
    *,
    arguments: Mapping[str, Any] | None = None,
    loss: str = "auto",
    normalize: bool = False,
    max_bytes: int | None = None,
    subset: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    name: str | None = None,
) -> Dataset:
    """The user's ``(train, val)`` as a :class:`Dataset` on ``device``.

    ``source``: a dotted path to a function (``data._target_``), the function itself, or the ``(train, val)``
    pair. ``loss`` (``train.loss``) decides how the targets are read: the number of classes for
    cross-entropy, the number of outputs otherwise (``Dataset.num_classes`` is the model's output size).
    ``max_bytes``: the most the two splits may take on the device (``None``: half its free memory).
    """
    splits = _call_source(source, dict(arguments or {}))
    dev = torch.device(device)
    limit = max_bytes if max_bytes is not None else free_bytes(dev) * MAX_BYTES_FRACTION
    tensors = {}
    for split, part in zip(SPLITS, splits):
        keep = (lambda n: subset_indices(n, subset, seed)) if split == "train" else None
        tensors[split] = _split_tensors(split, part, limit, keep)
    (x_train, y_train), (x_val, y_val) = tensors["train"], tensors["val"]
    _check_compatible(x_train, y_train, x_val, y_val)
    total = sum(t.numel() * t.element_size() for t in (x_train, y_train, x_val, y_val))
    if total > limit:
        raise DataError(f"data.max_bytes: the data need {_size(total)} on {dev}, more than the {_size(limit)} "
                        "allowed; use a smaller dataset, data.subset, or raise data.max_bytes")
    chosen = resolve_loss(loss, y_train)
    resolve_loss(chosen.name, y_val)
    outputs = output_size(chosen, torch.cat([y_train, y_val]) if chosen.name == "cross_entropy" else y_train)
    label = name or _source_name(source)
    ds = Dataset(label, x_train, y_train, x_val, y_val, outputs)  # the train split is already the subset
    if normalize and ds.x_train.is_floating_point():
        if ds.x_train.dim() < 2:
            raise DataError(f"data.normalize: inputs of shape {tuple(ds.x_train.shape)} have no channel dimension; "
                            "give x as (N, 1) or set data.normalize=false")
        ds = normalize_dataset(ds)
    return ds.to(dev)


# ---- calling the user's function ------------------------------------------------------------------------------
def _call_source(source: Any, arguments: dict[str, Any]) -> tuple[Any, Any]:
    """``(train, val)`` from the source, or DataError naming ``data._target_``."""
    if isinstance(source, (tuple, list)):
        if arguments:
            raise DataError(f"data: +data.{next(iter(arguments))} is an argument for a data function, but the data "
                            "were given as (train, val)")
        splits = source
    else:
        function = _resolve(source)
        try:
            splits = function(**arguments)
        except TypeError as exc:
            raise DataError(f"data._target_: calling {_source_name(source)}"
                            f"({', '.join(arguments)}) failed: {first_line(exc)}") from None
        except Exception as exc:
            raise DataError(f"data._target_: {_source_name(source)} raised {type(exc).__name__}: "
                            f"{first_line(exc)}") from None
    if isinstance(splits, (tuple, list)) and len(splits) == 2 and all(
            isinstance(part, (torch.Tensor, np.ndarray)) for part in splits):
        raise DataError(f"data._target_: {_source_name(source)} returned two arrays; it must return (train, val), "
                        "each an (x, y) pair: ((x_train, y_train), (x_val, y_val))")
    if not isinstance(splits, (tuple, list)) or len(splits) != 2:
        raise DataError(f"data._target_: {_source_name(source)} must return (train, val), got "
                        f"{_describe(splits)}")
    return splits[0], splits[1]


def _resolve(source: Any) -> Callable[..., Any]:
    """The function a dotted path names (imported, not executed), or ``source`` itself when callable."""
    if callable(source):
        return source
    if not isinstance(source, str) or source.strip() in ("", "???"):
        raise DataError("data._target_: give your function as data._target_=package.module.function")
    try:
        function = locate(source)
    except ImportError as exc:
        raise DataError(f"data._target_: cannot import {source!r}: {first_line(exc)}") from None
    if not callable(function):
        raise DataError(f"data._target_: {source!r} is a {type(function).__name__}, not a function")
    return function


def _source_name(source: Any) -> str:
    if isinstance(source, str):
        return source
    if callable(source):
        return getattr(source, "__qualname__", None) or type(source).__name__
    return "custom"


# ---- one split to tensors -------------------------------------------------------------------------------------
def _split_tensors(split: str, part: Any, limit: float, keep: Callable[[int], Any] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` tensors (CPU) of one split: from a tuple of two array-likes, or a map-style dataset.
    ``keep(n)``: the indices to keep of ``n`` examples (``data.subset``), or None for all; a dataset is read
    at those indices only."""
    key = f"data.{split}"
    if isinstance(part, (tuple, list)) and len(part) == 2 and not _is_pair_dataset(part):
        x, y = _as_tensor(f"{key}.x", part[0]), _as_tensor(f"{key}.y", part[1])
    elif isinstance(part, torch.utils.data.TensorDataset) and len(part.tensors) == 2:
        x, y = (t.detach().cpu() for t in part.tensors)  # already tensors: no per-example reads
    elif hasattr(part, "__getitem__") and hasattr(part, "__len__"):
        x, y = _read_dataset(key, part, limit, keep)
        keep = None  # read at the kept indices already
    else:
        raise DataError(f"{key}: must be a tuple (x, y) of tensors or a map-style Dataset of (x, y) pairs, "
                        f"got {_describe(part)}")
    if x.dim() == 0 or y.dim() == 0:
        raise DataError(f"{key}: x and y need one row per example, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) == 0:
        raise DataError(f"{key}: the split is empty")
    if len(x) != len(y):
        raise DataError(f"{key}: x has {len(x)} examples but y has {len(y)}")
    index = keep(len(x)) if keep is not None else None
    if index is not None:
        index = torch.from_numpy(index)
        x, y = x[index], y[index]
    x, y = _standard_dtype(f"{key}.x", x), _standard_dtype(f"{key}.y", y)
    for what, t in (("x", x), ("y", y)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).reshape(len(t), -1).any(dim=1).nonzero()[0, 0])
            raise DataError(f"{key}.{what}: holds NaN or Inf (first in example {bad})")
    return x, y


def _is_pair_dataset(part: Sequence[Any]) -> bool:
    """A list of exactly two ``(x, y)`` pairs is a tiny dataset, not an ``(x, y)`` tuple of arrays."""
    return isinstance(part, list) and all(isinstance(p, tuple) and len(p) == 2 for p in part)


def _read_dataset(key: str, dataset: Any, limit: float, keep: Callable[[int], Any] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(x, y)`` pairs of a map-style dataset (those at ``keep(len)``, or all), stacked. The first pair
    sizes the whole, so a dataset that cannot fit is refused before it is read."""
    total = len(dataset)
    if total == 0:
        raise DataError(f"{key}: the split is empty")
    index = keep(total) if keep is not None else None
    order = [int(i) for i in index] if index is not None else range(total)
    n = len(order)
    first = _pair(key, dataset, order[0])
    per_example = sum(t.numel() * t.element_size() for t in first)
    if per_example * n > limit:
        raise DataError(f"data.max_bytes: {key} alone needs about {_size(per_example * n)} "
                        f"({n} examples), more than the {_size(limit)} allowed; raise data.max_bytes or use less data")
    xs, ys = [first[0]], [first[1]]
    for i in order[1:]:
        x, y = _pair(key, dataset, i)
        if x.shape != first[0].shape or y.shape != first[1].shape:
            raise DataError(f"{key}[{i}]: shapes {tuple(x.shape)}/{tuple(y.shape)} differ from example 0's "
                            f"{tuple(first[0].shape)}/{tuple(first[1].shape)}; every example must have one shape")
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def _pair(key: str, dataset: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        item = dataset[i]
    except Exception as exc:
        raise DataError(f"{key}[{i}]: reading it raised {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise DataError(f"{key}[{i}]: must be an (x, y) pair, got {_describe(item)}")
    return _as_tensor(f"{key}[{i}].x", item[0]), _as_tensor(f"{key}[{i}].y", item[1])


def _as_tensor(key: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (bool, int, float, np.number, np.ndarray)) or (
            isinstance(value, (list, tuple)) and value and not isinstance(value[0], (str, bytes))):
        try:
            return torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"{key}: cannot be read as a tensor: {first_line(exc)}") from None
    raise DataError(f"{key}: must be a tensor, a numpy array or numbers, got {_describe(value)} "
                    "(images? convert them to tensors first, e.g. with a ToTensor transform)")


def _standard_dtype(key: str, t: torch.Tensor) -> torch.Tensor:
    """Floats as float32, integers as int64; anything else refused."""
    if t.is_floating_point():
        return t.float()
    if t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        return t.long()
    raise DataError(f"{key}: dtype {t.dtype} is not supported; give floats or integers")


def _check_compatible(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor) -> None:
    """Both splits must hold examples of one shape and dtype class."""
    if x_train.shape[1:] != x_val.shape[1:]:
        raise DataError(f"data.val.x: examples of shape {tuple(x_val.shape[1:])}, but data.train.x has "
                        f"{tuple(x_train.shape[1:])}")
    if y_train.shape[1:] != y_val.shape[1:]:
        raise DataError(f"data.val.y: targets of shape {tuple(y_val.shape[1:])}, but data.train.y has "
                        f"{tuple(y_train.shape[1:])}")
    for what, a, b in (("x", x_train, x_val), ("y", y_train, y_val)):
        if a.is_floating_point() != b.is_floating_point():
            raise DataError(f"data.val.{what}: dtype {b.dtype}, but data.train.{what} is {a.dtype}")


# ---- sizes ------------------------------------------------------------------------------------------------------
def free_bytes(device: torch.device) -> float:
    """Free memory on ``device``: CUDA's free bytes, or the host's available memory (``inf`` if unknown)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return math.inf


def _size(n: float) -> str:
    """Bytes as ``512 B``, ``3.2 MiB``, ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__module__}.{type(value).__qualname__}" if not isinstance(value, (int, float, str)) \
        else repr(value)
