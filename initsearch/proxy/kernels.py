"""Which kernels run float32 matrix products on the CPU: ATen's default (MKL) or oneDNN, chosen by measuring.

PyTorch's CPU build runs float32 ``mm``/``bmm``/``baddbmm`` through MKL. On some CPUs MKL takes a slow path: on
an AMD EPYC it runs its AVX2 kernels, while oneDNN, which ships in the same build, runs AVX-512 kernels there.
ATen sends float32 products to oneDNN when ``torch.backends.mkldnn.matmul.fp32_precision`` is ``"bf16"``,
which is a *permission*: oneDNN **may** then compute in bfloat16 inside ("implicit down-conversion"), and
whether it does depends on the CPU (with AMX it would). So nothing here is assumed:
``choose_route(step, key)`` runs the caller's step both ways and takes the oneDNN route only when

- every output of the step (a loss, the gradients) matches the default route to float32 precision: each
  tensor within ``1e-4`` of its own largest magnitude (float32 rounding differs by ~1e-6 of it; bfloat16
  inputs, with 8 bits of mantissa, miss by ~1e-3 to 1e-2), and
- it ran faster (best of ``repeats`` timings each way, at least ``min_gain`` faster).

The verdict is cached per ``key`` (the caller puts every shape, the thread count and the device in it; the
step should compute on synthetic operands of those shapes, so that the verdict does not depend on values
that happen to be exact in bfloat16, such as zeros).
The route is a process-wide torch setting: ``Route`` sets it for the steps of a training loop and always puts
the caller's setting back. Where the caller already chose a precision other than the default (``"none"``,
or ``"ieee"``, which is also what ``torch.set_float32_matmul_precision("highest")`` reads as), or torch has
no such setting, the default route is kept. While the route is on, torch's legacy
``torch.get_float32_matmul_precision()`` raises (it refuses a mix of the legacy and the new settings); no
training step calls it.

Where it is taken, the oneDNN route can give bitwise the same losses and weights as the default one and run
a stacked population's steps faster; it can also be *slower* (for a single model, say), which is why it is
measured, not assumed (the figures are in docs/performance.md).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

log = logging.getLogger("initsearch")

ONEDNN = "bf16"  # the setting under which ATen sends float32 products to oneDNN (see the module docstring)
DEFAULT_PRECISIONS: tuple[str, ...] = ("none", "ieee")
RTOL = 1e-4
_VERDICTS: dict[Hashable, bool] = {}  # per key: exact and faster
_FASTER: dict[Hashable, bool] = {}  # per speed key: oneDNN timed faster (False: slower, or its first probe inexact)


def _backend() -> Any | None:
    """``torch.backends.mkldnn.matmul`` where this torch has its ``fp32_precision`` setting and oneDNN."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    backend = getattr(mkldnn, "matmul", None)
    if backend is None or not hasattr(backend, "fp32_precision") or not mkldnn.is_available():
        return None
    return backend


def available() -> bool:
    """Whether the oneDNN route can be tried: torch has the setting, and it is at its default."""
    backend = _backend()
    return backend is not None and backend.fp32_precision in DEFAULT_PRECISIONS


class Route:
    """Sets the matrix-product route for a stretch of work; ``restore()`` puts the caller's setting back.

    ``use(False)`` is the caller's own setting, untouched. Use it as a context manager (or call ``restore`` in
    a ``finally``)."""

    def __init__(self) -> None:
        self._backend = _backend()
        self._saved = None if self._backend is None else self._backend.fp32_precision
        self._onednn = False

    def use(self, onednn: bool) -> None:
        if self._backend is None or onednn == self._onednn:
            return
        if onednn and self._saved not in DEFAULT_PRECISIONS:
            return
        self._backend.fp32_precision = ONEDNN if onednn else self._saved
        self._onednn = onednn

    def restore(self) -> None:
        self.use(False)

    def __enter__(self) -> Route:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def matches(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor], rtol: float = RTOL) -> bool:
    """Whether ``other`` equals ``reference`` tensor by tensor to float32 precision: same shapes, and every
    element within ``rtol`` times that tensor's largest magnitude (NaN/inf: never)."""
    if len(reference) != len(other):
        return False
    for ref, got in zip(reference, other):
        if ref.shape != got.shape:
            return False
        ref, got = ref.detach().double(), got.detach().double()
        if not (torch.isfinite(ref).all() and torch.isfinite(got).all()):
            return False
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        if ref.numel() and float((ref - got).abs().max()) > rtol * scale:
            return False
    return True


def _timed(step: Callable[[], Sequence[torch.Tensor]], route: Route, onednn: bool, repeats: int) -> float:
    route.use(onednn)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def known(key: Hashable) -> bool | None:
    """The cached verdict for ``key`` (``None`` before ``choose_route`` has decided it): lets a caller skip
    building its probe step."""
    return _VERDICTS.get(key)


def choose_route(step: Callable[[], Sequence[torch.Tensor]], key: Hashable, *, speed_key: Hashable = None,
                 repeats: int = 3, min_gain: float = 0.05) -> bool:
    """Whether ``step`` (a CPU computation returning the tensors to compare; it must not change any state the
    caller keeps) should run on the oneDNN route: exact to float32 precision and at least ``min_gain``
    faster than the default route. Exactness is checked and cached per ``key``; speed is timed once per
    ``speed_key`` (default: ``key``), so a caller can share one timing among shapes that only differ in a
    batch count. A key whose family's first probe was slower or inexact is answered ``False`` without a
    step (refusing is always safe: the default route is the reference). ``False`` where the route is not
    available."""
    if not available():
        return False
    if key in _VERDICTS:
        return _VERDICTS[key]
    speed_key = key if speed_key is None else speed_key
    if _FASTER.get(speed_key) is False:  # this family was slower or inexact on oneDNN: not probed again
        log.debug("matmul route for %s: default (refused for its family %s)", key, speed_key)
        _VERDICTS[key] = False
        return False
    with Route() as route:
        reference = [t.detach().clone() for t in step()]  # the first call also pays one-time costs
        route.use(True)
        fast = [t.detach().clone() for t in step()]
        exact = matches(reference, fast)
        if not exact:  # its family's other keys go unprobed (a CPU computing in bfloat16 does so whatever the shape)
            _FASTER.setdefault(speed_key, False)
        elif speed_key not in _FASTER:
            default_s = _timed(step, route, False, repeats)
            onednn_s = _timed(step, route, True, repeats)
            _FASTER[speed_key] = onednn_s < (1.0 - min_gain) * default_s
    verdict = exact and _FASTER.get(speed_key, False)
    log.debug("matmul route for %s: %s (exact: %s)", key, "oneDNN" if verdict else "default", exact)
    _VERDICTS[key] = verdict
    return verdict


def forget() -> None:
    """Drop the cached verdicts (tests; or after changing threads or CPU affinity)."""
    _VERDICTS.clear()
    _FASTER.clear()
