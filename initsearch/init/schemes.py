"""The init schemes: name -> a small in-place function of (weight, params).

One small function per scheme, its formula and paper in its docstring (the style of ``torch.nn.init``);
``SCHEME_SPECS``, the one table of schemes, gives each name its function and what it accepts.
``init_weight``/``init_bias`` validate and apply one to a tensor.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from initsearch.errors import is_finite_number

WEIGHTED = frozenset({"linear", "conv"})
ALL_FAMILIES = frozenset({"linear", "conv", "norm"})


# ----------------------------------------------------------------------------------------------------------
# The scheme functions.
#
# Conventions shared by all of them (they match torch.nn.init):
# - a Linear weight is (out, in); a ConvNd weight is (out, in / groups, *kernel);
# - fan_in = (in / groups) * prod(kernel), fan_out = out * prod(kernel) (fan_out is not divided by groups);
# - uniform variants of a variance-based scheme draw U(-sqrt(3) * std, sqrt(3) * std), which has that std;
# - every draw uses the global torch RNG of the weight's device, so callers seed or fork it.
# ``scale`` (the searched multiplier) and the resolution of ``gain="auto"`` belong to the caller.
# ----------------------------------------------------------------------------------------------------------

FAN_MODES: tuple[str, ...] = ("fan_in", "fan_out")
BIAS_OPTIONS: tuple[str, ...] = ("zeros", "keep", "pytorch_default")
TRUNC_CUT: float = 2.0  # trunc_normal cuts at +-TRUNC_CUT * std (absolute bounds, as torch's a, b)


@dataclass(frozen=True)
class SchemeParams:
    """The resolved parameters one scheme function reads (``gain`` is a number here, never ``"auto"``)."""

    gain: float = 1.0
    mode: str = "fan_in"
    std: float | None = None
    a: float | None = None
    value: float | None = None
    groups: int = 1


def compute_fans(weight: torch.Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight, with ``torch.nn.init._calculate_fan_in_and_fan_out``'s semantics.

    Linear (out, in) -> (in, out); ConvNd (out, in/groups, *k) -> ((in/groups) * prod(k), out * prod(k)).
    A grouped conv needs no ``groups`` argument: its weight's second dimension is already in/groups.
    Raises ``ValueError`` for tensors with fewer than 2 dimensions (biases, norm weights have no fans).
    """
    if weight.dim() < 2:
        raise ValueError(f"fans are defined for tensors with at least 2 dimensions, got shape {tuple(weight.shape)}")
    receptive = math.prod(weight.shape[2:])
    return int(weight.shape[1]) * receptive, int(weight.shape[0]) * receptive


def _family(weight: torch.Tensor) -> str:
    """The layer family a weight's rank implies: <2 dims norm, 2 dims linear, more conv."""
    if weight.dim() < 2:
        return "norm"
    return "linear" if weight.dim() == 2 else "conv"


def _fan(weight: torch.Tensor, mode: str) -> int:
    """The fan ``mode`` selects (``fan_in`` or ``fan_out``)."""
    fan_in, fan_out = compute_fans(weight)
    return fan_in if mode == "fan_in" else fan_out


def _fill_normal(weight: torch.Tensor, std: float) -> None:
    """Draw N(0, std^2) in place."""
    weight.normal_(0.0, std)


def _fill_uniform(weight: torch.Tensor, std: float) -> None:
    """Draw U(-sqrt(3) std, sqrt(3) std) in place: the uniform law with standard deviation ``std``."""
    bound = math.sqrt(3.0) * std
    weight.uniform_(-bound, bound)


def _orthogonal_matrix(rows: int, cols: int, gain: float, like: torch.Tensor) -> torch.Tensor:
    """``gain`` times a random (semi-)orthogonal (rows, cols) matrix, Haar-distributed (Saxe et al. 2014).

    QR of a Gaussian matrix (of its transpose when rows < cols), with the signs of R's diagonal folded into
    Q so the law is uniform; rows are orthonormal when rows <= cols, columns when rows > cols. Computed in
    float32 at least (QR is not available in half precision) on ``like``'s device, returned in its dtype.
    """
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    gaussian = torch.randn(rows, cols, dtype=dtype, device=like.device)
    if rows < cols:
        gaussian = gaussian.T
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    q = q * torch.where(signs == 0, torch.ones_like(signs), signs)
    if rows < cols:
        q = q.T
    return (gain * q).to(like.dtype)


def _check_groups(weight: torch.Tensor, scheme: str, groups: int) -> None:
    """Refuse a ``groups`` that is not positive or does not divide the conv's out_channels."""
    if groups < 1 or weight.shape[0] % groups != 0:
        raise ValueError(
            f"groups: {scheme} needs out_channels ({weight.shape[0]}) divisible by a positive groups, got {groups}"
        )


def _check_conv_rank(weight: torch.Tensor, scheme: str) -> None:
    """Refuse weights that are not Conv1d/2d/3d weights (3 to 5 dimensions)."""
    if not 3 <= weight.dim() <= 5:
        raise ValueError(f"{scheme} needs a Conv1d/2d/3d weight (3 to 5 dims), got shape {tuple(weight.shape)}")


def _keep(weight: torch.Tensor, p: SchemeParams) -> None:
    """Leave the weight as it is (whatever the model's constructor or an earlier step set)."""


def _pytorch_default(weight: torch.Tensor, p: SchemeParams) -> None:
    """What ``nn.Linear``/``nn.ConvNd.reset_parameters()`` does: ``kaiming_uniform_(w, a=sqrt(5))``.

    That is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), Var = 1 / (3 fan_in) (PyTorch's "default" baseline).
    Calls torch's function so the draw is the one the layer's constructor would make from the same seed.
    """
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5.0))


def _zeros(weight: torch.Tensor, p: SchemeParams) -> None:
    """All zeros: the symmetry failure as a baseline, or Fixup/ZerO-style zero last layers (Zhang et al. 2019)."""
    weight.zero_()


def _constant(weight: torch.Tensor, p: SchemeParams) -> None:
    """Every entry ``value`` (e.g. a norm layer's gamma; Goyal et al. 2017 zero the last BN of a residual branch)."""
    weight.fill_(p.value)


def _normal(weight: torch.Tensor, p: SchemeParams) -> None:
    """N(0, std^2) with a fixed ``std`` ("small random" init)."""
    _fill_normal(weight, p.std)


def _uniform(weight: torch.Tensor, p: SchemeParams) -> None:
    """U(-a, a) with a fixed bound ``a``; its std is a / sqrt(3)."""
    weight.uniform_(-p.a, p.a)


def _trunc_normal(weight: torch.Tensor, p: SchemeParams) -> None:
    """N(0, std^2) cut at +-2 std (absolute bounds passed to ``torch.nn.init.trunc_normal_``).

    The cut law's standard deviation is std * 0.8796 (= sqrt(1 - 4 phi(2) / (Phi(2) - Phi(-2)))).
    """
    cut = TRUNC_CUT * p.std
    torch.nn.init.trunc_normal_(weight, mean=0.0, std=p.std, a=-cut, b=cut)


def _xavier_std(weight: torch.Tensor, gain: float) -> float:
    """Glorot & Bengio 2010: std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = compute_fans(weight)
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def _xavier_normal(weight: torch.Tensor, p: SchemeParams) -> None:
    """Xavier/Glorot normal (Glorot & Bengio 2010): N(0, gain^2 * 2 / (fan_in + fan_out)), as torch."""
    _fill_normal(weight, _xavier_std(weight, p.gain))


def _xavier_uniform(weight: torch.Tensor, p: SchemeParams) -> None:
    """Xavier/Glorot uniform (Glorot & Bengio 2010): U(+-gain * sqrt(6 / (fan_in + fan_out))), as torch."""
    _fill_uniform(weight, _xavier_std(weight, p.gain))


def _fan_std(weight: torch.Tensor, p: SchemeParams) -> float:
    """std = gain / sqrt(fan), the fan chosen by ``mode`` (LeCun et al. 1998; He et al. 2015)."""
    return p.gain / math.sqrt(_fan(weight, p.mode))


def _lecun_normal(weight: torch.Tensor, p: SchemeParams) -> None:
    """LeCun normal (LeCun et al. 1998, "Efficient BackProp"): N(0, gain^2 / fan), gain 1 by default.

    torch has no LeCun; it equals ``kaiming_normal_(nonlinearity="linear")``. Written from the formula.
    """
    _fill_normal(weight, _fan_std(weight, p))


def _lecun_uniform(weight: torch.Tensor, p: SchemeParams) -> None:
    """LeCun uniform (LeCun et al. 1998): U(+-sqrt(3) * gain / sqrt(fan)), i.e. Var = gain^2 / fan."""
    _fill_uniform(weight, _fan_std(weight, p))


def _kaiming_normal(weight: torch.Tensor, p: SchemeParams) -> None:
    """Kaiming/He normal (He et al. 2015): N(0, gain^2 / fan), as ``torch.nn.init.kaiming_normal_``.

    The caller passes the activation's gain (sqrt(2) for relu, see ``activations.activation_gain``).
    """
    _fill_normal(weight, _fan_std(weight, p))


def _kaiming_uniform(weight: torch.Tensor, p: SchemeParams) -> None:
    """Kaiming/He uniform (He et al. 2015): U(+-sqrt(3) * gain / sqrt(fan)), as ``kaiming_uniform_``."""
    _fill_uniform(weight, _fan_std(weight, p))


def _orthogonal(weight: torch.Tensor, p: SchemeParams) -> None:
    """gain * a random semi-orthogonal matrix of the weight flattened to (out, -1) (Saxe et al. 2014).

    Like ``torch.nn.init.orthogonal_``: W W^T = gain^2 I when out <= in * prod(k), else W^T W = gain^2 I.
    """
    rows = weight.shape[0]
    cols = weight.numel() // rows
    weight.copy_(_orthogonal_matrix(rows, cols, p.gain, weight).reshape(weight.shape))


def _identity(weight: torch.Tensor, p: SchemeParams) -> None:
    """gain * identity (Le et al. 2015; ZerO, Zhao et al. 2022).

    Linear: ``torch.nn.init.eye_`` (ones on the main diagonal, zeros elsewhere, so a non-square weight is
    an identity padded with zeros). Conv: ``torch.nn.init.dirac_(w, groups)``, a Dirac delta at the kernel
    centre (index k // 2) mapping, within each group, channel i to channel i; with padding k // 2 and
    out = in the conv is the identity map. With out > in only the first ``in`` output channels copy the
    input (the partial identity of airbench's convolutions, Jordan 2024); the extra ones are all zero.
    """
    if weight.dim() == 2:
        torch.nn.init.eye_(weight)
    else:
        _check_conv_rank(weight, "identity")
        _check_groups(weight, "identity", p.groups)
        torch.nn.init.dirac_(weight, groups=p.groups)
    weight.mul_(p.gain)


def _delta_orthogonal(weight: torch.Tensor, p: SchemeParams) -> None:
    """Delta-orthogonal (Xiao et al. 2018): zero kernel except the centre tap, gain * an orthogonal matrix.

    The centre is index k // 2 in each spatial dimension (so for even k the tap after the middle). The
    centre holds an (out, in/groups) matrix. With groups = 1 it is one random semi-orthogonal matrix; with
    groups > 1 each group's (out/groups, in/groups) block is drawn orthogonal on its own, since that block
    is the linear map the grouped conv applies, so the conv preserves norms per group (gain times) whenever
    out/groups >= in/groups. This norm preservation (dynamical isometry at gain^2 E[phi'^2] = 1) is the
    point of the scheme.
    """
    _check_conv_rank(weight, "delta_orthogonal")
    _check_groups(weight, "delta_orthogonal", p.groups)
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    out_per_group = out_channels // p.groups
    centre = tuple(k // 2 for k in weight.shape[2:])
    blocks = [_orthogonal_matrix(out_per_group, in_per_group, p.gain, weight) for _ in range(p.groups)]
    weight.zero_()
    weight[(slice(None), slice(None), *centre)] = torch.cat(blocks, dim=0)


# ----------------------------------------------------------------------------------------------------------
# The table: one row per scheme, its function and what it accepts.
# ----------------------------------------------------------------------------------------------------------

SchemeFunction = Callable[[torch.Tensor, SchemeParams], None]


@dataclass(frozen=True)
class SchemeSpec:
    """A scheme: its name, its function, the layer families it applies to, its parameters, its default gain.

    ``function(weight, params)`` fills ``weight`` in place (``init_weight`` validates first and holds
    ``torch.no_grad()``). ``params`` lists the policy fields besides ``scale``/``bias``/``lsuv`` it reads (a
    policy that sets any other is refused); ``required`` those that must be given. ``default_gain`` is
    ``None`` for schemes without a gain, a number, or ``"auto"`` (from the following activation).
    """

    name: str
    function: SchemeFunction = field(repr=False)
    families: frozenset[str]
    params: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    default_gain: float | str | None = None


def _spec(name, function, families=WEIGHTED, params=(), required=(), default_gain=None) -> SchemeSpec:
    return SchemeSpec(name, function, frozenset(families), frozenset(params), frozenset(required), default_gain)


SCHEME_SPECS: dict[str, SchemeSpec] = {
    s.name: s
    for s in (
        _spec("keep", _keep, ALL_FAMILIES),
        _spec("pytorch_default", _pytorch_default),
        _spec("zeros", _zeros, ALL_FAMILIES),
        _spec("constant", _constant, ALL_FAMILIES, params=("value",), required=("value",)),
        _spec("normal", _normal, params=("std",), required=("std",)),
        _spec("uniform", _uniform, params=("a",), required=("a",)),
        _spec("trunc_normal", _trunc_normal, params=("std",), required=("std",)),
        _spec("xavier_normal", _xavier_normal, params=("gain",), default_gain=1.0),
        _spec("xavier_uniform", _xavier_uniform, params=("gain",), default_gain=1.0),
        _spec("lecun_normal", _lecun_normal, params=("gain", "mode"), default_gain=1.0),
        _spec("lecun_uniform", _lecun_uniform, params=("gain", "mode"), default_gain=1.0),
        _spec("kaiming_normal", _kaiming_normal, params=("gain", "mode"), default_gain="auto"),
        _spec("kaiming_uniform", _kaiming_uniform, params=("gain", "mode"), default_gain="auto"),
        _spec("orthogonal", _orthogonal, params=("gain",), default_gain=1.0),
        _spec("identity", _identity, params=("gain",), default_gain=1.0),
        _spec("delta_orthogonal", _delta_orthogonal, frozenset({"conv"}), params=("gain",), default_gain=1.0),
    )
}
SCHEME_NAMES: tuple[str, ...] = tuple(SCHEME_SPECS)


# ----------------------------------------------------------------------------------------------------------
# Validation and the entry points.
# ----------------------------------------------------------------------------------------------------------


def _check_positive(name: str, x: object, scheme: str) -> None:
    """Refuse a parameter that is not a positive finite number."""
    if not is_finite_number(x) or x <= 0:
        raise ValueError(f"{name}: {scheme} needs a positive finite number, got {x!r}")


def _validate(weight: torch.Tensor, scheme: str, params: SchemeParams) -> None:
    """Check the scheme name, the tensor's family, the mode and the parameters the scheme requires."""
    spec = SCHEME_SPECS.get(scheme)
    if spec is None:
        raise ValueError(f"scheme: unknown scheme {scheme!r}; expected one of {', '.join(SCHEME_NAMES)}")
    family = _family(weight)
    if family not in spec.families:
        raise ValueError(
            f"scheme: {scheme!r} does not apply to a {weight.dim()}-D weight ({family} family, shape "
            f"{tuple(weight.shape)}); it applies to: {', '.join(sorted(spec.families))}"
        )
    if params.mode not in FAN_MODES:
        raise ValueError(f"mode: must be 'fan_in' or 'fan_out', got {params.mode!r}")
    for name in sorted(spec.required):
        if getattr(params, name) is None:
            raise ValueError(f"{name}: required by scheme {scheme!r} but not given")
    if "std" in spec.required:
        _check_positive("std", params.std, scheme)
    if "a" in spec.required:
        _check_positive("a", params.a, scheme)
    if "value" in spec.required and not is_finite_number(params.value):
        raise ValueError(f"value: {scheme} needs a finite number, got {params.value!r}")
    if spec.default_gain is not None:
        _check_positive("gain", params.gain, scheme)
    if isinstance(params.groups, bool) or not isinstance(params.groups, int) or params.groups < 1:
        raise ValueError(f"groups: must be a positive integer, got {params.groups!r}")


def init_weight(
    weight: torch.Tensor,
    scheme: str,
    *,
    gain: float = 1.0,
    mode: str = "fan_in",
    std: float | None = None,
    a: float | None = None,
    value: float | None = None,
    groups: int = 1,
) -> None:
    """Initialize ``weight`` in place with ``scheme`` (a name of ``SCHEME_SPECS``), under ``torch.no_grad()``.

    ``gain`` is a number already (the caller resolves ``None``/``"auto"``); it is read by the schemes
    with a default gain and ignored by the others. ``mode`` picks the fan of lecun/kaiming; ``std``, ``a``,
    ``value`` are the parameters of normal/trunc_normal, uniform, constant; ``groups`` is the conv's groups
    (read by identity and delta_orthogonal). 1-D weights (norm layers) accept keep, zeros and constant
    only. ``scale`` is the caller's to apply. Draws come from the global torch RNG.

    Raises ``ValueError`` for an unknown scheme, a scheme whose families do not include the tensor's
    (delta_orthogonal on a Linear weight, orthogonal on a 1-D weight), a mode other than fan_in/fan_out,
    a missing or invalid required parameter, or a groups that does not divide out_channels.
    Zero-element tensors are validated and left alone (they have no fans).
    """
    params = SchemeParams(gain=gain, mode=mode, std=std, a=a, value=value, groups=groups)
    _validate(weight, scheme, params)
    if weight.numel() == 0:
        return
    with torch.no_grad():
        SCHEME_SPECS[scheme].function(weight, params)


def init_bias(bias: torch.Tensor, option: str | float, *, fan_in: int) -> None:
    """Initialize a bias in place, under ``torch.no_grad()``.

    ``"zeros"``; ``"keep"`` (leave it); ``"pytorch_default"``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as
    ``nn.Linear``/``nn.ConvNd.reset_parameters`` (bound 0 when fan_in is 0, as torch); or a finite number
    (every entry that constant). ``fan_in`` is the layer weight's (see ``compute_fans``). Anything else
    raises ``ValueError``.
    """
    if isinstance(option, str):
        if option not in BIAS_OPTIONS:
            raise ValueError(f"bias: expected one of {', '.join(BIAS_OPTIONS)} or a number, got {option!r}")
    elif not is_finite_number(option):
        raise ValueError(f"bias: expected one of {', '.join(BIAS_OPTIONS)} or a finite number, got {option!r}")
    if option == "keep":
        return
    with torch.no_grad():
        if option == "zeros":
            bias.zero_()
        elif option == "pytorch_default":
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            bias.uniform_(-bound, bound)
        else:
            bias.fill_(float(option))
