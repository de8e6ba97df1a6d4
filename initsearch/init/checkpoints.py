"""Weight files a version 2 policy copies layers from: read safely, hash-checked, cached.

A checkpoint is a state dict (a mapping of names to tensors). ``read_state_dict`` checks the file's sha256
before reading a byte of it as a checkpoint, then reads it with ``torch.load(weights_only=True)`` (the
restricted unpickler: tensors, containers and numbers only, nothing imported or called), or with
``safetensors`` for a ``.safetensors`` file when that optional package is installed. Every problem is one
``PolicyError`` naming the checkpoint. Files read once are kept (by path, size, mtime and hash) so a study
that initializes hundreds of proxies reads its pre-trained weights once.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import pickle
import warnings
from collections import OrderedDict

import torch

from initsearch.errors import PolicyError

__all__ = ["file_sha256", "layers_that_fit", "read_state_dict", "save_state_dict"]

_CACHE: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
_CACHE_SIZE = 4


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as 64 lower-case hex digits (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_state_dict(model: torch.nn.Module, path: str | os.PathLike) -> str:
    """Write ``model.state_dict()`` with ``torch.save`` (creating folders) and return the file's sha256."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: t.detach().cpu().clone() for name, t in model.state_dict().items()}, target)
    return file_sha256(target)


def _load(path: pathlib.Path, where: str) -> object:
    """The file's content: safetensors for ``.safetensors``, else the restricted ``torch.load``."""
    if path.suffix == ".safetensors":
        if importlib.util.find_spec("safetensors") is None:
            raise PolicyError(f"{where}.path: {path.name} is a .safetensors file, which needs the optional "
                              "safetensors package: pip install 'initsearch[safetensors]'")
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise PolicyError(f"{where}.path: not a readable safetensors file ({exc})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise PolicyError(f"{where}: refused, the file needs pickle beyond tensors (nothing in it was run): "
                          f"{_unpickling_reason(exc)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PolicyError(f"{where}.path: not a readable torch checkpoint ({first})") from None


def _unpickling_reason(exc: Exception) -> str:
    """The line of torch's refusal that names what the file asked for (``unsupported GLOBAL posix.system``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line.rstrip(".")
    return lines[-1] if lines else type(exc).__name__


def read_state_dict(path: str | os.PathLike, sha256: str, where: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` after checking its sha256; ``where`` (e.g. ``checkpoints.backbone``) leads
    every error message. The returned tensors are shared with the cache: copy them before writing."""
    file = pathlib.Path(path)
    try:
        info = file.stat()
    except FileNotFoundError:
        raise PolicyError(f"{where}.path: file not found: {file}") from None
    except OSError as exc:
        raise PolicyError(f"{where}.path: cannot read {file}: {exc.strerror}") from None
    if not file.is_file():
        raise PolicyError(f"{where}.path: not a file: {file}")
    key = (str(file.resolve()), info.st_size, info.st_mtime_ns, sha256)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    try:
        actual = file_sha256(file)
    except OSError as exc:
        raise PolicyError(f"{where}.path: cannot read {file}: {exc.strerror}") from None
    if actual != sha256:
        raise PolicyError(f"{where}.sha256: the file {file.name} has sha256 {actual}, the policy says {sha256}; "
                          "the file changed or the policy names another one")
    content = _load(file, where)
    if not isinstance(content, dict):
        raise PolicyError(f"{where}: not a state dict (a mapping of names to tensors), got {type(content).__name__}")
    for name, value in content.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            shown = f"{name!r} -> {type(value).__name__}"
            raise PolicyError(f"{where}: not a state dict (a mapping of names to tensors): entry {shown}")
    state = dict(content)
    _CACHE[key] = state
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return state


def layers_that_fit(model: torch.nn.Module, names: list[str], state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Which of the layers ``names`` of ``model`` could be copied from ``state`` under their own names.

    A layer fits when the state dict has every tensor the checkpoint scheme would copy into it (its weight,
    its bias if it has one, a norm layer's running statistics) with the same shape. Returns the layers that
    fit, and for the others one reason each (``"4: weight (5, 16) vs '4.weight' (3, 16)"``).
    """
    modules = dict(model.named_modules())
    fits, reasons = [], []
    for name in names:
        module = modules[name]
        problem = None
        for attr in ("weight", "bias", "running_mean", "running_var"):
            target = getattr(module, attr, None)
            if target is None:
                continue
            entry = state.get(f"{name}.{attr}")
            if entry is None:
                problem = f"{name}: no {name}.{attr} in the file"
            elif tuple(entry.shape) != tuple(target.shape):
                problem = f"{name}: {attr} {tuple(target.shape)} vs '{name}.{attr}' {tuple(entry.shape)}"
            if problem:
                break
        if problem:
            reasons.append(problem)
        else:
            fits.append(name)
    return fits, reasons
