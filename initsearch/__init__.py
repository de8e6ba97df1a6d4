"""initsearch: find how to initialize a network's weights, layer by layer, and apply it to your model.

Public API::

    import initsearch
    result = initsearch.search(MyNet, ((x_train, y_train), (x_val, y_val)), n_trials=20)
    report = initsearch.apply_policy(model, "policy.json", example_batch=x, seed=0)
    table = initsearch.validate_policy(result.policy, MyNet, ((x_train, y_train), (x_val, y_val)))

The names below load on first use (PEP 562), so ``import initsearch.errors`` alone, as the MLflow writer
process does, imports no torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "initsearch.api": ("SearchResult", "validate_policy"),
    "initsearch.init.apply": ("ApplyReport", "LayerApplyReport", "apply_policy"),
    "initsearch.init.diagnostics": ("SignalReport", "gradient_quotient", "signal_report"),
    "initsearch.errors": ("ConfigError", "DataError", "InitSearchError", "PolicyError"),
    "initsearch.init.layers": ("LayerDiscovery", "LayerInfo", "discover_layers"),
    "initsearch.init.lsuv": ("LsuvReport", "lsuv"),
    "initsearch.init.policy": ("InitPolicy", "InitSpec", "LsuvSettings", "Rule", "load_policy", "save_policy"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
# ``search`` is also the Python entry point: the package is callable (``initsearch.search(model, data)``).
_SUBMODULES = ("errors", "init", "proxy", "contenders", "search", "tracking", "cli", "export", "validate", "api")

__all__ = sorted([*_HOME_OF, "search"])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # ``initsearch.errors`` after a plain ``import initsearch``
        return importlib.import_module(f"initsearch.{name}")
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'initsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({"__version__", *__all__, *_SUBMODULES})


if TYPE_CHECKING:  # what type checkers and editors see
    from initsearch.api import SearchResult, search, validate_policy
    from initsearch.errors import ConfigError, DataError, InitSearchError, PolicyError
    from initsearch.init.apply import ApplyReport, LayerApplyReport, apply_policy
    from initsearch.init.diagnostics import SignalReport, gradient_quotient, signal_report
    from initsearch.init.layers import LayerDiscovery, LayerInfo, discover_layers
    from initsearch.init.lsuv import LsuvReport, lsuv
    from initsearch.init.policy import InitPolicy, InitSpec, LsuvSettings, Rule, load_policy, save_policy
