"""The search: settings from the Hydra config, search spaces, the Optuna storage, workers sharing a
study, one trial lifecycle (``trial.TrialRun``) for the sequential and the population runner, the study,
and its summary.

This package is also callable: ``initsearch.search(model, data, ...)`` is ``initsearch.api.search``, the
Python entry point (the public name and this folder's name coincide). The call looks the function up by
name when it is made, so this folder still imports nothing from the commands above it.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    """The ``initsearch.search`` package, callable as ``initsearch.api.search``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return importlib.import_module("initsearch.api").search(*args, **kwargs)

    @property
    def __signature__(self) -> Any:  # help() and editors show the function's signature
        import inspect

        return inspect.signature(importlib.import_module("initsearch.api").search)


sys.modules[__name__].__class__ = _CallablePackage
