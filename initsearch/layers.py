"""Find a model's weighted layers in forward order, and the activation that follows each one.

(skeleton: discover_layers is being written)
"""
from __future__ import annotations

from dataclasses import dataclass

LINEAR_TYPES = ("Linear",)
CONV_TYPES = ("Conv1d", "Conv2d", "Conv3d")
NORM_TYPES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
              "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")


@dataclass(frozen=True)
class LayerInfo:
    """One weighted layer of a model, as a policy rule sees it.

    ``family`` is ``linear``, ``conv`` or ``norm``. ``position`` is ``first``, ``hidden`` or ``last`` by
    forward order among the linear and conv layers (``None`` for norm layers). ``activation`` is the
    nonlinearity applied to this layer's output on its way to the next linear/conv layer (norm layers,
    dropout, pooling and reshapes are looked through), ``linear`` if none; ``activation_param`` is the
    negative slope of a leaky_relu (or alpha of an elu), else ``None``. Fans follow ``torch.nn.init``
    (``None`` for norm layers).
    """

    name: str
    type: str
    family: str
    fan_in: int | None
    fan_out: int | None
    activation: str
    activation_param: float | None
    position: str | None
    index: int
    weight_shape: tuple[int, ...]


@dataclass(frozen=True)
class LayerDiscovery:
    """The result of ``discover_layers``: the layers in forward order and how they were found."""

    layers: tuple[LayerInfo, ...]
    method: str  # "fx" or "hooks"

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerInfo:
        return self.layers[i]

    def by_name(self) -> dict[str, LayerInfo]:
        return {layer.name: layer for layer in self.layers}
