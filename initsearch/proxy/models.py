"""Proxy networks for the search: an MLP, a plain VGG-style CNN and a small residual CNN.

A study trains many of these briefly, so they are small, and their module names are stable and readable:
policies refer to layers by name (``fc1``, ``conv3``, ``stages.1.0.conv2``, ``out``), and the same names
exist at every width, so a policy searched on a narrow proxy (``width_multiplier: 0.5``) applies by name to
the full-width one. A user's own model is built from a Hydra ``_target_`` instead.

Every bad value raises ``initsearch.errors.ConfigError`` whose message names the config key, e.g.
``model.depth: must be >= 1, got 0``.
"""
from __future__ import annotations

import inspect
import logging
import math
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from initsearch.errors import ConfigError, first_line, is_finite_number
from initsearch.init.activations import ACTIVATIONS, make_activation

MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn", "rescnn")
MLP_NORMS: tuple[str, ...] = ("batch", "layer")
CONV_NORMS: tuple[str, ...] = ("batch",)


# --------------------------------------------------------------------------------------------------------
# value checks (each raises ConfigError naming the key)
# --------------------------------------------------------------------------------------------------------
def _int_at_least(key: str, value: Any, minimum: int) -> int:
    """``value`` as an int if it is an integer (not a bool) >= ``minimum``, else ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key}: must be >= {minimum}, got {value}")
    return int(value)


def _int_list(key: str, values: Any, minimum: int = 1) -> list[int]:
    """A non-empty sequence of integers >= ``minimum`` as a list, else ConfigError naming ``key``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ConfigError(f"{key}: must be a non-empty list of integers, got {values!r}")
    return [_int_at_least(f"{key}[{i}]", v, minimum) for i, v in enumerate(values)]


def _activation_names(key: str, activation: str | Sequence[str], count: int) -> list[str]:
    """One activation name per hidden layer: a single name is repeated, a list must have ``count`` names."""
    names = [activation] * count if isinstance(activation, str) else list(activation)
    if len(names) != count:
        raise ConfigError(f"{key}: expected one name or a list of {count} names, got {len(names)}: {activation!r}")
    for i, name in enumerate(names):
        if name not in ACTIVATIONS:
            where = key if isinstance(activation, str) else f"{key}[{i}]"
            raise ConfigError(f"{where}: unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return names


def _norm_name(key: str, norm: str | None, allowed: tuple[str, ...]) -> str | None:
    """``norm`` if it is ``None`` or one of ``allowed``, else ConfigError naming ``key``."""
    if norm is not None and norm not in allowed:
        raise ConfigError(f"{key}: must be null or one of {', '.join(allowed)}, got {norm!r}")
    return norm


def _shape(input_shape: Sequence[int], ndim: int | None = None) -> tuple[int, ...]:
    """The input shape (without the batch dimension) as a tuple of positive ints."""
    shape = tuple(_int_list("model.input_shape", input_shape))
    if ndim is not None and len(shape) != ndim:
        raise ConfigError(f"model.input_shape: this model needs {ndim} dimensions (C, H, W), got {shape}")
    return shape


# --------------------------------------------------------------------------------------------------------
# the proxies
# --------------------------------------------------------------------------------------------------------
class _FlatSequential(nn.Sequential):
    """An ``nn.Sequential`` whose slices are plain ``nn.Sequential``s (``model[:-2]`` keeps the names).

    ``nn.Sequential`` builds a slice by calling ``self.__class__`` with the modules, which a subclass with
    its own constructor arguments cannot take.
    """

    def __getitem__(self, idx: int | slice) -> nn.Module:
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)


class MLP(_FlatSequential):
    """A fully connected net: ``flatten, fc1, [norm1], act1, [drop1], fc2, ..., out``.

    ``depth`` counts the Linear layers including ``out`` (depth 1 is logistic regression on the flattened
    input). ``activation`` is one name for every hidden layer or a list of ``depth - 1`` names. ``norm``
    (``"batch"`` or ``"layer"``) sits between each hidden Linear and its activation; dropout follows the
    activation. It is a flat ``nn.Sequential`` so the module names are the ones listed, with no prefix.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 3, width: int = 128,
                 activation: str | Sequence[str] = "relu", norm: str | None = None, dropout: float = 0.0) -> None:
        shape = _shape(input_shape)
        num_classes = _int_at_least("model.num_classes", num_classes, 1)
        depth = _int_at_least("model.depth", depth, 1)
        width = _int_at_least("model.width", width, 1)
        acts = _activation_names("model.activation", activation, depth - 1)
        norm = _norm_name("model.norm", norm, MLP_NORMS)
        if not is_finite_number(dropout) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {dropout!r}")
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        fan_in = math.prod(shape)
        for i, act in enumerate(acts, start=1):
            layers[f"fc{i}"] = nn.Linear(fan_in, width)
            if norm is not None:
                layers[f"norm{i}"] = nn.BatchNorm1d(width) if norm == "batch" else nn.LayerNorm(width)
            layers[f"act{i}"] = make_activation(act)
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(float(dropout))
            fan_in = width
        layers["out"] = nn.Linear(fan_in, num_classes)
        super().__init__(layers)


class CNN(_FlatSequential):
    """A plain VGG-style CNN: ``conv1, [norm1], act1, [pool1], conv2, ..., gap, flatten, [fc1, act_fc], out``.

    Convolutions keep the spatial size (padding ``kernel_size // 2``). A ``MaxPool2d(2)`` named
    ``pool{i}`` follows conv ``i`` when ``i`` is a multiple of ``pool_every`` and the feature map is still
    at least 2x2, so the map never shrinks below 1x1 (8x8 inputs with 4 convs pool after conv1-3 only).
    ``activation`` is one name, or a list with one name per conv plus one for ``fc1`` when ``fc_width`` is
    set. With ``norm="batch"`` a ``BatchNorm2d`` sits between each conv and its activation, and the conv
    has no bias (the norm's shift replaces it).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64, 128),
                 activation: str | Sequence[str] = "relu", norm: str | None = None, pool_every: int = 1,
                 kernel_size: int = 3, fc_width: int | None = None) -> None:
        in_ch, height, width = _shape(input_shape, ndim=3)
        num_classes = _int_at_least("model.num_classes", num_classes, 1)
        chans = _int_list("model.channels", channels)
        pool_every = _int_at_least("model.pool_every", pool_every, 1)
        kernel_size = _int_at_least("model.kernel_size", kernel_size, 1)
        if fc_width is not None:
            fc_width = _int_at_least("model.fc_width", fc_width, 1)
        acts = _activation_names("model.activation", activation, len(chans) + (fc_width is not None))
        norm = _norm_name("model.norm", norm, CONV_NORMS)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (out_ch, act) in enumerate(zip(chans, acts), start=1):
            layers[f"conv{i}"] = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=norm is None)
            if norm is not None:
                layers[f"norm{i}"] = nn.BatchNorm2d(out_ch)
            layers[f"act{i}"] = make_activation(act)
            height, width = _conv_out(height, kernel_size), _conv_out(width, kernel_size)
            if i % pool_every == 0 and min(height, width) >= 2:
                layers[f"pool{i}"] = nn.MaxPool2d(2)
                height, width = height // 2, width // 2
            in_ch = out_ch
        layers["gap"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        if fc_width is not None:
            layers["fc1"] = nn.Linear(in_ch, fc_width)
            layers["act_fc"] = make_activation(acts[-1])
            in_ch = fc_width
        layers["out"] = nn.Linear(in_ch, num_classes)
        super().__init__(layers)


def _conv_out(size: int, kernel_size: int) -> int:
    """Spatial size after a stride-1 conv with padding ``k // 2`` (same size for odd ``k``, +1 for even)."""
    return size + 2 * (kernel_size // 2) - kernel_size + 1


class BasicBlock(nn.Module):
    """A residual basic block: ``act2(norm2(conv2(act1(norm1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity, or a 1x1 conv ``proj`` (followed by ``proj_norm`` when normalized) when
    the channel count or the stride changes. ``conv1`` carries the stride.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, activation: str, norm: str | None) -> None:
        super().__init__()
        bias = norm is None
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = nn.BatchNorm2d(out_ch) if norm else nn.Identity()
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias)
        self.norm2 = nn.BatchNorm2d(out_ch) if norm else nn.Identity()
        needs_proj = in_ch != out_ch or stride != 1
        self.proj = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=bias) if needs_proj else None
        self.proj_norm = nn.BatchNorm2d(out_ch) if needs_proj and norm else None
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        shortcut = x
        if self.proj is not None:
            shortcut = self.proj(x)
            if self.proj_norm is not None:
                shortcut = self.proj_norm(shortcut)
        return self.act2(branch + shortcut)


class ResCNN(nn.Module):
    """A small residual CNN: ``stem`` (3x3 conv), ``stages.{s}.{b}`` basic blocks, ``gap``, ``out``.

    Stage ``s`` has ``channels[s]`` channels and ``blocks_per_stage`` blocks. The first block of every stage
    after the first halves the spatial size (stride 2) while the map is at least 2x2. ``activation`` is one
    name for every activation; ``norm="batch"`` adds ``BatchNorm2d`` after each conv (``stem_norm``,
    ``stages.{s}.{b}.norm1/norm2/proj_norm``); without it those slots are ``nn.Identity`` (or absent).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64),
                 blocks_per_stage: int = 1, activation: str = "relu", norm: str | None = None) -> None:
        super().__init__()
        in_ch, height, width = _shape(input_shape, ndim=3)
        num_classes = _int_at_least("model.num_classes", num_classes, 1)
        chans = _int_list("model.channels", channels)
        blocks = _int_at_least("model.blocks_per_stage", blocks_per_stage, 1)
        if not isinstance(activation, str):
            raise ConfigError(f"model.activation: ResCNN takes one activation name, got {activation!r}")
        act = _activation_names("model.activation", activation, 1)[0]
        norm = _norm_name("model.norm", norm, CONV_NORMS)
        self.stem = nn.Conv2d(in_ch, chans[0], 3, padding=1, bias=norm is None)
        self.stem_norm = nn.BatchNorm2d(chans[0]) if norm else nn.Identity()
        self.stem_act = make_activation(act)
        stages: list[nn.Sequential] = []
        size, prev = min(height, width), chans[0]
        for s, out_ch in enumerate(chans):
            stride = 2 if s > 0 and size >= 2 else 1
            size = (size + 1) // 2 if stride == 2 else size
            stage = [BasicBlock(prev if b == 0 else out_ch, out_ch, stride if b == 0 else 1, act, norm)
                     for b in range(blocks)]
            stages.append(nn.Sequential(*stage))
            prev = out_ch
        self.stages = nn.Sequential(*stages)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem_norm(self.stem(x)))
        return self.out(self.flatten(self.gap(self.stages(x))))


# --------------------------------------------------------------------------------------------------------
# width multiplier and the config entry point
# --------------------------------------------------------------------------------------------------------
def scale_width(width_or_channels: int | Sequence[int], multiplier: float) -> int | list[int]:
    """Scale a width (or each of a list of channel counts) by ``multiplier``: ``max(1, round(w * m))``.

    Only sizes change, never names, so a policy searched at ``0.5`` applies by name at ``1.0``. Python's
    ``round`` rounds halves to even (``round(2.5) == 2``). Raises ``ValueError`` for a multiplier that is
    not a positive finite number or a width below 1.
    """
    if not is_finite_number(multiplier) or multiplier <= 0:
        raise ValueError(f"width multiplier must be a positive finite number, got {multiplier!r}")

    def one(w: int) -> int:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"width must be an integer >= 1, got {w!r}")
        return max(1, round(w * multiplier))

    if isinstance(width_or_channels, Sequence):
        return [one(w) for w in width_or_channels]
    return one(width_or_channels)


_BUILTIN: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "rescnn": ResCNN}
_WIDTH_KEYS: dict[str, tuple[str, ...]] = {"mlp": ("width",), "cnn": ("channels", "fc_width"), "rescnn": ("channels",)}


def build_model(cfg: Mapping[str, Any], input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build a proxy from a model config (a dict or an OmegaConf ``DictConfig``).

    Either ``cfg["name"]`` is ``mlp``, ``cnn`` or ``rescnn`` and the other keys are that constructor's
    arguments plus ``width_multiplier`` (default 1.0, applied to ``width``/``channels``/``fc_width``
    through ``scale_width``); unknown keys are refused (they are usually typos). Or ``cfg["_target_"]``
    names a user's class (``package.module.Class``, or the class itself) built by ``hydra.utils.instantiate``
    with ``target_arguments``. ``_target_`` wins over ``name``.
    """
    plain = _to_plain_dict(cfg)
    if plain.get("_target_") is not None:
        return _build_target(plain, input_shape, num_classes)
    name = plain.pop("name", None)
    if name not in _BUILTIN:
        raise ConfigError(f"model.name: must be one of {', '.join(MODEL_NAMES)} (or give a _target_), got {name!r}")
    multiplier = plain.pop("width_multiplier", 1.0)
    _check_keys(name, plain)
    params = inspect.signature(_BUILTIN[name].__init__).parameters
    for key in _WIDTH_KEYS[name]:
        value = plain.get(key, params[key].default)
        if value is not None:
            plain[key] = _scaled(key, value, multiplier)
    return _BUILTIN[name](input_shape, num_classes, **plain)


def _to_plain_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A plain ``dict`` copy of the config (OmegaConf containers resolved and converted)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"model: must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def _check_keys(name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse keys that the constructor of ``name`` does not take."""
    params = inspect.signature(_BUILTIN[name].__init__).parameters
    allowed = [p for p in params if p not in ("self", "input_shape", "num_classes")]
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(f"model.{key}: unknown key for {name}; expected one of "
                              f"{', '.join(['name', 'width_multiplier', *allowed])}")


def _scaled(key: str, value: Any, multiplier: Any) -> int | list[int]:
    """``scale_width`` with errors turned into ConfigErrors naming the key."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = _int_list(f"model.{key}", value)
    else:
        value = _int_at_least(f"model.{key}", value, 1)
    try:
        return scale_width(value, multiplier)
    except ValueError as err:
        raise ConfigError(f"model.width_multiplier: {err}") from err


# Keys of the model config that are initsearch's, never an argument of the user's class.
TARGET_SETTINGS: tuple[str, ...] = ("name", "width_multiplier", "width_arg")
_HYDRA_KEYS: tuple[str, ...] = ("_target_", "_convert_", "_partial_", "_recursive_", "_args_")


class _Silent(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def locate(path: str) -> Any:
    """The object a dotted path names, imported (Hydra's ``get_object``, without the ERROR lines it logs);
    else ``ImportError`` whose message says why in one line: ``No module named 'pkg'``, ``module 'pkg.mod'
    has no attribute 'Net'``, or what the module raised on import."""
    from hydra.utils import get_object

    logger, silent = logging.getLogger("hydra.utils"), _Silent()
    logger.addFilter(silent)
    try:
        return get_object(path)
    except Exception as err:  # Hydra's message: "Error loading 'path':" then the cause's repr and a hint
        cause = err.__cause__
        missing = getattr(cause, "name", None) if isinstance(cause, ModuleNotFoundError) else None
        parent, _, attribute = (missing or "").rpartition(".")
        if missing and parent in sys.modules and f"{path}.".startswith(f"{missing}."):
            reason = f"module {parent!r} has no attribute {attribute!r}"
        elif isinstance(cause, (ImportError, AttributeError)):
            reason = first_line(cause)
        elif cause is not None:
            reason = first_line(cause, with_type=True)
        else:
            reason = first_line(err).removeprefix(f"Error loading '{path}':").strip() or type(err).__name__
        raise ImportError(reason) from err
    finally:
        logger.removeFilter(silent)


def target_name(target: Any) -> str:
    """A model's ``_target_`` as text: the dotted path as given, or a callable's module and qualified name."""
    if isinstance(target, str):
        return target
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"


def target_arguments(cfg: Mapping[str, Any], obj: Any, input_shape: Sequence[int], num_classes: int) -> dict[str, Any]:
    """The keyword arguments a user's class receives: its own (every key of the config that is not one of
    ``TARGET_SETTINGS`` or Hydra's, and, where ``name`` is a built-in proxy's, none of that proxy's keys),
    plus ``input_shape``, ``num_classes`` and ``width_multiplier`` where its signature names them and the
    config does not set them. ``model.width_arg`` names an argument that is a width (an int or a list of
    ints): it is scaled by ``width_multiplier`` as the built-in proxies' widths are."""
    plain = dict(cfg)
    target = target_name(plain.get("_target_"))
    multiplier = plain.get("width_multiplier", 1.0)
    if not is_finite_number(multiplier) or multiplier <= 0:
        raise ConfigError(f"model.width_multiplier: must be a number > 0, got {multiplier!r}")
    width_arg = plain.get("width_arg")
    builtin = plain.get("name") in _BUILTIN
    dropped = set(TARGET_SETTINGS) | set(_HYDRA_KEYS)
    if builtin:  # ``+model._target_`` on a built-in group: that proxy's keys are not the user's
        dropped |= set(inspect.signature(_BUILTIN[plain["name"]].__init__).parameters)
    own = {key: value for key, value in plain.items() if key not in dropped}
    for key in own:
        if not _accepts(obj, key):
            raise ConfigError(f"model.{key}: {target} takes no argument {key!r}")
    implied = {"input_shape": tuple(input_shape), "num_classes": num_classes, "width_multiplier": float(multiplier)}
    own.update({key: value for key, value in implied.items() if key not in own and _names(obj, key)})
    if width_arg is not None and _names(obj, "width_multiplier"):
        raise ConfigError(f"model.width_arg: {target} takes width_multiplier itself; with model.width_arg too its "
                          "width would be scaled twice: set model.width_arg=null")
    if width_arg is not None:
        if not isinstance(width_arg, str) or not _accepts(obj, width_arg):
            raise ConfigError(f"model.width_arg: {target} takes no argument {width_arg!r}")
        value = own.get(width_arg, _default_of(obj, width_arg))
        if value is None:
            raise ConfigError(f"model.width_arg: give {width_arg} a value (+model.{width_arg}=...): "
                              f"{target} has no default for it")
        own[width_arg] = _scaled(width_arg, value, multiplier)
    elif multiplier != 1.0 and not _names(obj, "width_multiplier"):
        raise ConfigError(f"model.width_multiplier: {multiplier} asks for a narrower proxy, but {target} takes no "
                          "width_multiplier argument; set model.width_arg to the argument that is its width, or "
                          "model.width_multiplier=1")
    return own


def _build_target(cfg: dict[str, Any], input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Instantiate a user's ``_target_`` (a dotted path, or a class or factory given from Python) with
    ``target_arguments``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = cfg["_target_"]
    name = target_name(target)
    if isinstance(target, str) and target.strip() in ("", "???"):
        raise ConfigError("model._target_: give your class as model._target_=package.module.Class")
    if isinstance(target, str):
        try:
            obj = locate(target)
        except ImportError as err:
            raise ConfigError(f"model._target_: cannot import {target!r}: {first_line(err)}") from err
    elif callable(target):
        obj = target
    else:
        raise ConfigError(f"model._target_: must name a class (package.module.Class), got {target!r}")
    if not callable(obj):
        raise ConfigError(f"model._target_: {name!r} is a {type(obj).__name__}, not a class")
    arguments = target_arguments(cfg, obj, input_shape, num_classes)
    hydra_keys = {key: cfg[key] for key in ("_convert_", "_recursive_") if key in cfg}
    try:
        if isinstance(target, str):  # Hydra's instantiate locates the dotted path (the arguments go in as given)
            model = instantiate({"_target_": target, "_convert_": "all", **hydra_keys, "_partial_": True})(**arguments)
        else:  # a class or factory given from Python (instantiate would look it up by name again)
            model = obj(**arguments)
    except InstantiationException as err:
        raise ConfigError(f"model._target_: building {name!r} failed: {first_line(err.__cause__ or err)}") from err
    except Exception as err:
        raise ConfigError(f"model._target_: {name!r} raised {type(err).__name__}: {first_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_: {name!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def _names(obj: Any, name: str) -> bool:
    """Whether ``obj``'s signature has a parameter called ``name`` (``**kwargs`` alone does not count: a
    class is handed ``input_shape``/``num_classes``/``width_multiplier`` only where it asks for them)."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    p = params.get(name)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _default_of(obj: Any, name: str) -> Any:
    try:
        p = inspect.signature(obj).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _accepts(obj: Any, name: str) -> bool:
    """Whether calling ``obj`` accepts a keyword argument ``name``."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.kind == p.VAR_KEYWORD
               for p in params)


# --------------------------------------------------------------------------------------------------------
# the network a joint architecture + init search builds
# --------------------------------------------------------------------------------------------------------
class JointMLP(nn.Module):
    """An MLP whose shape a joint search chooses: ``flatten, fc1, [norm1], act1, ..., out``.

    ``depth`` counts the Linear layers including ``out``; ``norm`` is ``None``, ``"batch"`` or ``"layer"``;
    with ``residual``, every hidden layer after the first adds its input back (``h + act(norm(fc(h)))``,
    the widths match), so its Linear is a residual branch end. Names as in ``MLP`` (``fc1``, ``norm1``,
    ``act1``, ``out``), so role policies and ``width_multiplier`` work the same. Built through
    ``model._target_`` (``best_model.yaml`` of a joint study names it).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 3, width: int = 128,
                 activation: str = "relu", norm: str | None = None, residual: bool = False,
                 width_multiplier: float = 1.0) -> None:
        super().__init__()
        shape = _shape(input_shape)
        num_classes = _int_at_least("model.num_classes", num_classes, 1)
        self.depth = _int_at_least("model.depth", depth, 1)
        width = _scaled("width", _int_at_least("model.width", width, 1), width_multiplier)
        acts = _activation_names("model.activation", activation, self.depth - 1)
        norm = _norm_name("model.norm", norm, MLP_NORMS)
        if not isinstance(residual, bool):
            raise ConfigError(f"model.residual: must be true or false, got {residual!r}")
        self.residual = residual
        self.flatten = nn.Flatten()
        fan_in = math.prod(shape)
        for i, act in enumerate(acts, start=1):
            self.add_module(f"fc{i}", nn.Linear(fan_in, width))
            if norm is not None:
                self.add_module(f"norm{i}", nn.BatchNorm1d(width) if norm == "batch" else nn.LayerNorm(width))
            self.add_module(f"act{i}", make_activation(act))
            fan_in = width
        self.out = nn.Linear(fan_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.flatten(x)
        for i in range(1, self.depth):
            y = getattr(self, f"fc{i}")(h)
            if hasattr(self, f"norm{i}"):
                y = getattr(self, f"norm{i}")(y)
            y = getattr(self, f"act{i}")(y)
            h = h + y if self.residual and i > 1 else y
        return self.out(h)


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters (what ``arch.max_params`` bounds)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class JointCNN(nn.Module):
    """A CNN whose shape a joint search chooses: ``conv1, [norm1], act1, [pool1], ..., gap, flatten, out``.

    ``stages`` 3x3 convolutions of ``channels`` channels each (the same count throughout, so every hidden
    conv is square and a skip needs no projection); ``norm`` is ``None``, ``"batch"`` (``BatchNorm2d``) or
    ``"layer"`` (``GroupNorm`` with one group: normalizes each example over channels and positions). With
    ``residual``, every conv after the first adds its input back (``h + act(norm(conv(h)))``), so it is a
    residual branch end. A ``MaxPool2d(2)`` named ``pool{i}`` follows stage ``i`` while the map is at least
    2x2, as in ``CNN``. Built through ``model._target_`` (``best_model.yaml`` of a joint CNN study names it).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, stages: int = 2, channels: int = 16,
                 activation: str = "relu", norm: str | None = None, residual: bool = False,
                 width_multiplier: float = 1.0) -> None:
        super().__init__()
        in_ch, height, width = _shape(input_shape, ndim=3)
        num_classes = _int_at_least("model.num_classes", num_classes, 1)
        self.stages = _int_at_least("model.stages", stages, 1)
        channels = _scaled("channels", _int_at_least("model.channels", channels, 1), width_multiplier)
        acts = _activation_names("model.activation", activation, self.stages)
        norm = _norm_name("model.norm", norm, MLP_NORMS)
        if not isinstance(residual, bool):
            raise ConfigError(f"model.residual: must be true or false, got {residual!r}")
        self.residual = residual
        size = min(height, width)
        for i, act in enumerate(acts, start=1):
            self.add_module(f"conv{i}", nn.Conv2d(in_ch, channels, 3, padding=1, bias=norm is None))
            if norm is not None:
                self.add_module(f"norm{i}", nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(1, channels))
            self.add_module(f"act{i}", make_activation(act))
            if size >= 2:
                self.add_module(f"pool{i}", nn.MaxPool2d(2))
                size //= 2
            in_ch = channels
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(1, self.stages + 1):
            y = getattr(self, f"conv{i}")(h)
            if hasattr(self, f"norm{i}"):
                y = getattr(self, f"norm{i}")(y)
            y = getattr(self, f"act{i}")(y)
            h = h + y if self.residual and i > 1 else y
            if hasattr(self, f"pool{i}"):
                h = getattr(self, f"pool{i}")(h)
        return self.out(self.flatten(self.gap(h)))
