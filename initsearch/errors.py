"""The exceptions initsearch raises on bad input.

Each carries one line that names the bad field or key and the value, so the CLI can print it as is.
"""
from __future__ import annotations


class InitSearchError(Exception):
    """Base class: an error in what the user gave us (a file, a config, a model), not a bug."""


class PolicyError(InitSearchError, ValueError):
    """A policy file or object is invalid, or cannot be applied to this model.

    The message names the field and the value, e.g. ``rules[2].scale: must be in (0, 100], got -1``.
    """


class ConfigError(InitSearchError, ValueError):
    """A composed Hydra config holds an invalid value; the message names the key."""


class DataError(InitSearchError):
    """A dataset is missing, corrupt, or refused (bad checksum, unsafe archive, bad batch file)."""
