"""Activation names shared by discovery, the policy file, the proxies and ``gain="auto"``.

The names are the ones the policy format uses (``relu``, ``leaky_relu``, ``tanh``, ``sigmoid``, ``gelu``,
``silu``, ``selu``, ``elu``, ``linear``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "silu", "selu", "elu", "linear")

# Second moment of phi(z), z ~ N(0, 1), for activations torch.nn.init.calculate_gain has no entry for.
# "auto" gain for these is 1 / sqrt(E[phi(z)^2]): the gain that keeps the pre-activation second moment
# at 1 from layer to layer (the argument of He et al. 2015, which gives sqrt(2) for ReLU). Computed by
# Gauss-Hermite quadrature.
SECOND_MOMENT_GAINS: dict[str, float] = {
    "gelu": 1.5335304411955357,  # E[gelu(z)^2] = 0.42522
    "silu": 1.676532470331092,  # E[silu(z)^2] = 0.35578
    "elu": 1.2451861198833705,  # E[elu(z)^2] = 0.64496 (alpha = 1)
}

DEFAULT_LEAKY_SLOPE = 0.01


def check_activation(name: str) -> str:
    """Return ``name`` if it is a known activation name, else raise ``ValueError`` listing the known ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return name


def activation_gain(name: str, param: float | None = None) -> float:
    """The ``gain="auto"`` value for an activation.

    Matches ``torch.nn.init.calculate_gain`` where torch has an entry (linear 1, sigmoid 1, tanh 5/3,
    relu sqrt(2), leaky_relu sqrt(2 / (1 + slope^2)), selu 3/4); for gelu, silu and elu it is the
    second-moment-preserving gain in ``SECOND_MOMENT_GAINS``. ``param`` is the leaky_relu slope
    (default 0.01); it is ignored for the others.
    """
    check_activation(name)
    if name in SECOND_MOMENT_GAINS:
        return SECOND_MOMENT_GAINS[name]
    if name == "leaky_relu":
        slope = DEFAULT_LEAKY_SLOPE if param is None else float(param)
        return math.sqrt(2.0 / (1.0 + slope**2))
    return float(torch.nn.init.calculate_gain(name))


def make_activation(name: str, param: float | None = None) -> nn.Module:
    """A fresh activation module for a name (``linear`` gives ``nn.Identity``)."""
    check_activation(name)
    if name == "leaky_relu":
        return nn.LeakyReLU(DEFAULT_LEAKY_SLOPE if param is None else float(param))
    if name == "elu":
        return nn.ELU(1.0 if param is None else float(param))
    return {
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "selu": nn.SELU,
        "linear": nn.Identity,
    }[name]()
