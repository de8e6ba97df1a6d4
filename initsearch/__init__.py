"""initsearch: find how to initialize a network's weights, layer by layer, and apply it to your model.

Public API::

    import initsearch
    report = initsearch.apply_policy(model, "policy.json", example_batch=x, seed=0)
"""
from __future__ import annotations

from initsearch.init.apply import ApplyReport, LayerApplyReport, apply_policy
from initsearch.init.diagnostics import SignalReport, gradient_quotient, signal_report
from initsearch.errors import ConfigError, DataError, InitSearchError, PolicyError
from initsearch.init.layers import LayerDiscovery, LayerInfo, discover_layers
from initsearch.init.lsuv import LsuvReport, lsuv
from initsearch.init.policy import InitPolicy, InitSpec, LsuvSettings, Rule, load_policy, save_policy

__version__ = "0.1.0"

__all__ = [
    "ApplyReport",
    "ConfigError",
    "DataError",
    "InitPolicy",
    "InitSearchError",
    "InitSpec",
    "LayerApplyReport",
    "LayerDiscovery",
    "LayerInfo",
    "LsuvReport",
    "LsuvSettings",
    "PolicyError",
    "Rule",
    "SignalReport",
    "apply_policy",
    "discover_layers",
    "gradient_quotient",
    "load_policy",
    "lsuv",
    "save_policy",
    "signal_report",
]
