"""The contenders every search stands beside: the textbook baselines as policies, and initializing a model
as a contender (a policy, sampled or from a file, a baseline, or a learned init).

The study's trials and ``validate`` both go through ``init_contender``, so a baseline is initialized the same
way wherever it is compared.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from initsearch.contenders.learned import LearnedInitResult, learned_base_policy, run_learned_baseline
from initsearch.contenders.names import LEARNED_BASELINES, PRETRAINED_BASELINES, TEXTBOOK_BASELINES, learned_method
from initsearch.errors import ConfigError
from initsearch.init.apply import apply_policy
from initsearch.init.layers import LayerDiscovery
from initsearch.init.policy import CheckpointRef, InitPolicy, LsuvSettings
from initsearch.proxy.losses import resolve_loss
from initsearch.proxy.train import TrainConfig

BASELINES: dict[str, dict[str, Any]] = {
    # What nn.Linear/nn.ConvNd.reset_parameters do: kaiming_uniform(a=sqrt 5) -> U(+-1/sqrt fan_in), bias likewise.
    "pytorch_default": {"scheme": "pytorch_default", "bias": "pytorch_default"},
    # Glorot & Bengio 2010, the uniform form of the paper, gain 1.
    "xavier": {"scheme": "xavier_uniform", "gain": 1.0},
    # He et al. 2015: N(0, gain^2/fan_in), gain from the activation.
    "he": {"scheme": "kaiming_normal", "gain": "auto", "mode": "fan_in"},
    # LeCun et al. 1998: N(0, 1/fan_in).
    "lecun": {"scheme": "lecun_normal"},
    # Saxe et al. 2014, with the activation's gain.
    "orthogonal": {"scheme": "orthogonal", "gain": "auto"},
}


def baseline_policy(name: str) -> InitPolicy:
    """The policy of a textbook baseline: one scheme for every linear/conv layer (``lsuv`` = orthogonal
    pre-init followed by LSUV, as Mishkin & Matas 2016)."""
    if name == "lsuv":
        default, lsuv = {"scheme": "orthogonal", "gain": 1.0}, LsuvSettings().to_dict()
    elif name in BASELINES:
        default, lsuv = dict(BASELINES[name]), None
    else:
        raise ConfigError(f"baselines: unknown baseline {name!r}; expected any of {', '.join(BASELINE_NAMES)}")
    data: dict[str, Any] = {"format": "initsearch-policy", "version": 1, "rules": [], "default": default}
    if lsuv:
        data["lsuv"] = lsuv
    return InitPolicy.from_dict(data)


BASELINE_NAMES: tuple[str, ...] = TEXTBOOK_BASELINES  # BASELINES and "lsuv"


PRETRAINED = "pretrained"  # the name a study's pre-trained weights have in its policies' checkpoints


def pretrained_rules() -> list[dict[str, Any]]:
    """The rules that copy every linear/conv layer and every norm layer (weights, running statistics) from
    the checkpoint ``pretrained``; norm layers first, since only a rule that names them reaches them."""
    return [{"type": "norm", "scheme": "checkpoint", "checkpoint": PRETRAINED},
            {"scheme": "checkpoint", "checkpoint": PRETRAINED}]


def pretrained_policy(name: str, weights: CheckpointRef | None) -> InitPolicy:
    """The two baselines of a study with pre-trained weights: ``checkpoint`` copies every layer from the
    file; ``checkpoint_fresh_head`` copies every layer but the last, which gets PyTorch's default init (what
    a fine-tuning recipe gets by building a new head)."""
    if weights is None:
        raise ConfigError(f"baselines: {name!r} needs pre-trained weights: pretrained=PATH (a state dict of the model)")
    rules = pretrained_rules()
    if name == "checkpoint_fresh_head":
        rules.insert(0, {"position": "last", **BASELINES["pytorch_default"]})
    return InitPolicy.from_dict({"format": "initsearch-policy", "version": 2,
                                 "checkpoints": {PRETRAINED: weights.to_dict()}, "rules": rules})


def contender_policy(baseline: str, pretrained: CheckpointRef | None = None) -> InitPolicy:
    """The policy a baseline starts from (for GradInit/MetaInit: the base init they rescale); the
    checkpoint baselines need the study's ``pretrained`` weights."""
    if baseline in PRETRAINED_BASELINES:
        return pretrained_policy(baseline, pretrained)
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
        options: dict[str, Any] = {}
        method = learned_method(baseline)
        if method == "gradinit":  # GradInit's virtual step mimics the training optimizer (SGD: g, Adam: sign g)
            options["optimizer"] = "adam" if train.optimizer in ("adam", "adamw") else "sgd"
        loss = resolve_loss(train.loss, train_y)
        if loss.name != "cross_entropy":  # both methods minimize the study's own loss
            options["loss_fn"] = loss.mean
        if method == "metainit" and (loss.name != "cross_entropy" or not train_x.is_floating_point()):
            options["random_batch"] = False  # random N(0, 1) inputs and class labels fit classification only
        return run_learned_baseline(baseline, model, train_x, train_y, seed=seed, batch_size=train.batch_size, options=options)
    apply_policy(model, policy, example_batch=example_x, seed=seed, layers=layers)
    return policy, None
