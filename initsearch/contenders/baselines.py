"""Initializing a model as a contender: a policy (sampled, a file, a textbook baseline) or a learned init.

The study's trials and ``validate`` both go through ``init_contender``, so a baseline is initialized the same
way wherever it is compared.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from initsearch.init.apply import apply_policy
from initsearch.init.layers import LayerDiscovery
from initsearch.contenders.learned import LEARNED_BASELINES, LearnedInitResult, learned_base_policy, run_learned_baseline
from initsearch.init.policy import InitPolicy
from initsearch.search.space import BASELINE_NAMES, baseline_policy
from initsearch.proxy.train import TrainConfig

ALL_BASELINES: tuple[str, ...] = (*BASELINE_NAMES, *LEARNED_BASELINES)


def contender_policy(baseline: str) -> InitPolicy:
    """The policy a baseline starts from (for GradInit/MetaInit: the base init they rescale)."""
    return learned_base_policy(baseline) if baseline in LEARNED_BASELINES else baseline_policy(baseline)


def init_contender(
    model: nn.Module,
    policy: InitPolicy,
    *,
    baseline: str | None,
    seed: int,
    example_x: torch.Tensor,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    train: TrainConfig,
    layers: LayerDiscovery | None = None,
) -> tuple[InitPolicy, LearnedInitResult | None]:
    """Initialize ``model`` in place; return the policy that reproduces it (the learned one for GradInit and
    MetaInit, whose extra forward/backward passes the result counts) and the learned result, if any.
    ``layers``: the proxy's discovered layers, passed to ``apply_policy`` so it does not trace every copy."""
    if baseline in LEARNED_BASELINES:
        options: dict[str, Any] | None = None
        if baseline == "gradinit":  # GradInit's virtual step mimics the training optimizer (SGD: g, Adam: sign g)
            options = {"optimizer": "adam" if train.optimizer in ("adam", "adamw") else "sgd"}
        return run_learned_baseline(baseline, model, train_x, train_y, seed=seed, batch_size=train.batch_size, options=options)
    apply_policy(model, policy, example_batch=example_x, seed=seed, layers=layers)
    return policy, None
