"""One trial's life, the same for both runners: policy, per seed a fresh proxy, its init and a short run,
score, aggregate, and how it ended.

``TrialRun`` holds these steps; the sequential runner (``sequential.py``, one trial inside Optuna's
``study.optimize``) and the population runner (``batched.py``, K trials asked together and trained as one
population) only decide how models are trained and how results are told to Optuna. So a trial means the
same thing whichever runner ran it: the same policy, seeds, checks, score, user attributes, and the same
mapping from what went wrong to the trial's state (``TrialRun.end_by``).

How a trial can end: complete (also at once, with the score of an earlier complete trial that had the same
parameters); pruned (by the pruner, the pre-screen, a diverged loss, non-finite weights or score); failed
with ``user_attrs["reason"]`` (an exception, e.g. in a user's model, or CUDA out of memory: the cache is
emptied for the next trial); failed ``interrupted by SIGINT``/``SIGTERM`` (then also enqueued again, once).
"""
from __future__ import annotations

import gc
import logging
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from initsearch.contenders.baselines import contender_policy, init_contender
from initsearch.errors import ConfigError, InitSearchError, first_line, interrupt_reason
from initsearch.init.checkpoints import layers_that_fit, read_state_dict
from initsearch.init.diagnostics import is_degenerate, signal_report
from initsearch.init.layers import LayerDiscovery, LayerInfo, discover_layers
from initsearch.init.policy import InitPolicy
from initsearch.init.seeding import forked_seed
from initsearch.proxy.data import Dataset, keep_classes, load_dataset
from initsearch.proxy.losses import LOSSES, Loss, resolve_loss
from initsearch.proxy.models import build_model, count_parameters, target_name
from initsearch.proxy.popsize import auto_population_size
from initsearch.proxy.population import train_population
from initsearch.proxy.scoring import ACCURACY_METRICS, aggregate, partial_score, score
from initsearch.proxy.train import Curve, TrainConfig, subnormals_flushed, train_run
from initsearch.proxy.userdata import load_user_data
from initsearch.search.outcome import TrialOutcome, safely, trial_score
from initsearch.search.settings import StudySettings, resolve_device
from initsearch.search.space import Pretrained
from initsearch.search.storage import one_append, set_user_attrs
from initsearch.search.workers import enqueue_retry

log = logging.getLogger("initsearch")

STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


# ---- what every trial shares ---------------------------------------------------------------------------------
@dataclass
class Proxy:
    """The data on the device, the example batch, and the proxy model's discovered layers."""

    data: Dataset
    example_x: torch.Tensor
    example_y: torch.Tensor
    layers: tuple[LayerInfo, ...]
    device: torch.device
    layer_method: str = "fx"  # how discover_layers found them ("fx" or "hooks")
    loss: Loss = LOSSES["cross_entropy"]  # the study's training loss (train.loss resolved for these targets)
    pretrained: Pretrained | None = None  # the study's pre-trained weights and the layers that fit them

    @property
    def discovery(self) -> LayerDiscovery:
        """The layers as ``apply_policy(layers=...)`` takes them: every fresh copy of the proxy has these."""
        return LayerDiscovery(self.layers, self.layer_method)


def prepare(settings: StudySettings) -> Proxy:
    """Load the data and discover the proxy's layers: everything that can fail on a bad config fails here,
    before the study's storage is touched."""
    device = resolve_device(settings.device)
    data = load_data(settings.data, settings.train.loss, seed=settings.seed, device=device)
    if settings.data.get("classes") is not None:
        data = keep_classes(data, settings.data["classes"])
    loss = resolve_loss(settings.train.loss, data.y_train)
    if not loss.has_accuracy and settings.score.metric in ACCURACY_METRICS:
        raise ConfigError(f"score.metric: {settings.score.metric} needs accuracy, which a study trained with "
                          f"{loss.name} (float targets) does not have; use auc_loss or final_val_loss")
    g = torch.Generator(device="cpu").manual_seed(settings.seed)
    idx = torch.randperm(len(data.x_train), generator=g)[: settings.lsuv_batch].to(device)
    example_x, example_y = data.x_train[idx], data.y_train[idx]
    model = build_model(settings.model, data.input_shape, data.num_classes).to(device)
    target = settings.model.get("_target_")
    try:
        discovery = discover_layers(model, example_x)
        with torch.no_grad():
            out = model(example_x[:2]).float()
            check_outputs(out, example_y[:2], loss, data.num_classes, target)
            loss.mean(out, example_y[:2])
    except InitSearchError:
        raise
    except Exception as exc:  # a user's model that fails on the data: one line, before the study opens
        raise ConfigError(f"{model_label(target)} failed on a batch of {data.name} data: "
                          f"{type(exc).__name__}: {first_line(exc)}") from None
    pretrained = None if settings.pretrained is None else check_pretrained(settings, model, discovery)
    if settings.space.arch is not None:
        check_budget(settings, data)
    return Proxy(data, example_x, example_y, discovery.layers, device, discovery.method, loss, pretrained)


def model_label(target: object) -> str:
    """How an error names the model: the user's class (``model._target_: pkg.Net``) or the built-in proxy."""
    return f"model._target_: {target_name(target)}" if target is not None else "model: the proxy"


def check_outputs(out: torch.Tensor, y: torch.Tensor, loss: Loss, num_classes: int, target: object) -> None:
    """The model's outputs must fit the targets: a logit per class for cross-entropy, else one value per target
    value (a batch of two could otherwise pass by broadcasting, and a missing class fail only in a trial)."""
    where = model_label(target)
    if loss.name == "cross_entropy":
        if out.dim() != 2 or out.shape[1] < num_classes:
            raise ConfigError(f"{where} gives outputs of shape {tuple(out.shape[1:])} per example, but the data have "
                              f"{num_classes} classes (labels 0..{num_classes - 1}): it needs {num_classes} logits")
    elif out.numel() != y.numel():
        raise ConfigError(f"{where} gives outputs of shape {tuple(out.shape[1:])} per example, but the targets "
                          f"have shape {tuple(y.shape[1:])}: it needs one output per target value")


USER_DATA_SETTINGS = ("name", "_target_", "normalize", "subset", "max_bytes")  # initsearch's keys of data=custom
BUILTIN_DATA_SETTINGS = ("root", "url", "md5", "download", "val_fraction", "synthetic")


def load_data(d: dict, loss: str, *, seed: int, device: torch.device) -> Dataset:
    """The study's data on ``device``: the user's function (``data._target_``, called with the other keys of
    ``data`` as its arguments) or a built-in dataset (``data.name``)."""
    if d.get("_target_") is not None:
        max_bytes = d.get("max_bytes")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ConfigError(f"data.max_bytes: must be a whole number of bytes >= 1 or null, got {max_bytes!r}")
        ignored = USER_DATA_SETTINGS + (BUILTIN_DATA_SETTINGS if d.get("name") != "custom" else ())
        arguments = {key: value for key, value in d.items() if key not in ignored}
        return load_user_data(d["_target_"], arguments=arguments, loss=loss, normalize=bool(d.get("normalize", False)),
                              max_bytes=max_bytes, subset=d.get("subset"), seed=seed, device=device)
    return load_dataset(
        d.get("name"),
        root=d.get("root"),
        url=d.get("url"),
        md5=d.get("md5"),
        download=bool(d.get("download", True)),
        val_fraction=float(d.get("val_fraction", 0.2)),
        subset=d.get("subset"),
        normalize=bool(d.get("normalize", True)),
        seed=seed,
        device=device,
        synthetic=d.get("synthetic"),
    )


def check_budget(settings: StudySettings, data: Dataset) -> None:
    """A joint space whose smallest architecture is over ``arch.max_params`` fails before the study opens."""
    arch = settings.space.arch
    if arch.max_params is None:
        return
    smallest = count_parameters(build_model(arch.smallest(), data.input_shape, data.num_classes))
    if smallest > arch.max_params:
        raise ConfigError(f"arch.max_params: no architecture of the joint space fits {arch.max_params} parameters; "
                          f"the smallest ({arch.describe_smallest()}) has {smallest}")


def check_pretrained(settings: StudySettings, model: torch.nn.Module, discovery: LayerDiscovery) -> Pretrained:
    """The proxy's layers that the ``pretrained`` file can initialize; one ``ConfigError`` line when the file
    is no state dict, cannot be read safely, or fits none of them."""
    weights = settings.pretrained
    try:
        state = read_state_dict(weights.path, weights.sha256, "pretrained")
    except InitSearchError as exc:
        raise ConfigError(str(exc).replace("pretrained.path: ", "pretrained: ", 1)) from None
    fits, reasons = layers_that_fit(model, [layer.name for layer in discovery.layers], state)
    if not any(layer.name in fits for layer in discovery.layers if layer.family in ("linear", "conv")):
        shown = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
        raise ConfigError(f"pretrained: no layer of the proxy fits {weights.path} ({shown}); it must be a state dict "
                          "of this model (at width_multiplier=1, the target)")
    return Pretrained(weights, frozenset(fits))


def fresh_model(model_cfg: dict, data: Dataset, device: torch.device, seed: int) -> torch.nn.Module:
    """A new model of ``model_cfg`` for ``data``, built under ``seed`` (the same seed, the same weights), on
    ``device``."""
    with forked_seed(seed):
        model = build_model(model_cfg, data.input_shape, data.num_classes)
    return model.to(device)


def train_contender(model_cfg: dict, data: Dataset, device: torch.device, policy: InitPolicy, baseline: str | None,
                    seed: int, train: TrainConfig, example_x: torch.Tensor,
                    layers: LayerDiscovery | None = None) -> Curve:
    """A fresh model of ``model_cfg`` under ``seed``, initialized as the contender (``policy``, or the
    baseline's own init), trained with ``train``: one seed of a contender outside a trial (the selection stage,
    ``validate``)."""
    return train_run(_contender_model(model_cfg, data, device, policy, baseline, seed, train, example_x, layers),
                     data, train, seed=seed)


def _contender_model(model_cfg: dict, data: Dataset, device: torch.device, policy: InitPolicy,
                     baseline: str | None, seed: int, train: TrainConfig, example_x: torch.Tensor,
                     layers: LayerDiscovery | None) -> torch.nn.Module:
    model = fresh_model(model_cfg, data, device, seed)
    init_contender(model, policy, baseline=baseline, seed=seed, example_x=example_x, train_x=data.x_train,
                   train_y=data.y_train, train=train, layers=layers)
    return model


def train_contenders(model_cfg: dict, data: Dataset, device: torch.device,
                     contenders: Sequence[tuple[InitPolicy, str | None]], seed: int, train: TrainConfig,
                     example_x: torch.Tensor, layers: LayerDiscovery | None = None, together: int = 1,
                     on_done: Callable[[int, Curve], None] | None = None) -> list[Curve]:
    """``train_contender`` for every ``(policy, baseline)`` on one seed, in order. With ``together > 1`` up
    to that many are trained at once as one population (``train_population``: they share the seed, so one
    batch per step serves them all), which matches one at a time up to float rounding
    (``tests/test_population.py``); ``select.batch_trials`` decides it for the selection stage, ``batch_trials``
    for ``validate``.
    ``on_done(i, curve)`` runs as soon as contender ``i`` is trained (progress)."""
    curves: list[Curve] = []
    size = max(together, 1)
    with subnormals_flushed():  # as in the study's trials (the selection stage and validate run outside it)
        for start in range(0, len(contenders), size):
            group = contenders[start:start + size]
            if len(group) == 1:
                trained = [train_contender(model_cfg, data, device, *group[0], seed, train, example_x, layers)]
            else:
                models = [_contender_model(model_cfg, data, device, policy, baseline, seed, train, example_x, layers)
                          for policy, baseline in group]
                trained = train_population(models, data, train, seeds=[seed] * len(models)).curves
            for curve in trained:
                if on_done is not None:
                    on_done(len(curves), curve)
                curves.append(curve)
    return curves


def population_size(settings: StudySettings, model_cfg: dict, data: Dataset, device: torch.device,
                    what: str = "model(s) trained at once", fit_memory: bool = False,
                    key: str = "batch_trials", value: int | str | None = None, level: int = logging.INFO) -> int:
    """``batch_trials`` (or ``value``, the setting ``key``) as a number of models trained at once: itself, or
    for ``auto`` the K ``popsize.auto_population_size`` picks for ``model_cfg`` on ``device`` (logged at
    ``level``, as ``what``). ``fit_memory``: a number is also capped, on CUDA, at what fits in the free memory
    (``validate`` trains the full-size target, for which a K sized for the proxy may not fit)."""
    value = settings.batch_trials if value is None else value
    asked = None if value == "auto" else int(value)
    if asked is not None and (asked == 1 or not (fit_memory and device.type == "cuda")):
        return asked
    model = fresh_model(model_cfg, data, device, seed=0)
    k = auto_population_size(model, tuple(data.x_train.shape[1:]), settings.train.batch_size,
                             settings.train.optimizer, device)
    if asked is None:
        log.log(level, "%s=auto: %d %s on %s", key, k, what, device)
        return k
    if k < asked:
        log.log(level, "%s=%d: %d %s on %s, what fits in its free memory", key, asked, k, what, device)
    return min(k, asked)


# ---- one trial -----------------------------------------------------------------------------------------------
class TrialRun:
    """One trial from its policy to how it ended. The runners call, in order: ``begin``; for each evaluation
    seed ``init_model``, training with ``on_checkpoint``, ``record``; then ``conclude``; ``end_by`` for any
    exception; ``finish`` last. ``state`` is set once, by the first ``end``."""

    def __init__(self, settings: StudySettings, proxy: Proxy, trial: optuna.Trial,
                 heartbeat: Callable[[optuna.Trial], None]) -> None:
        self.s = settings
        self.proxy = proxy
        self.trial = trial
        self.heartbeat = heartbeat
        self.outcome = TrialOutcome(trial.number, trial.user_attrs.get("baseline"), params={})
        self.started = time.perf_counter()
        self.policy: InitPolicy | None = None
        self.model_cfg: dict = settings.model  # a joint trial's own network replaces these in ``begin``
        self.discovery: LayerDiscovery = proxy.discovery
        self.state: TrialState | None = None
        self.value: float | None = None  # the score
        self.n_params: int | None = None  # a joint trial's network size (its second objective, if any)

    @property
    def open(self) -> bool:
        return self.state is None

    @property
    def prunable(self) -> bool:
        """Searched trials report partial scores to the pruner; baselines never, and nothing does with
        ``pruner=none`` (each report would be a storage write and a read that no pruner looks at), nor in a
        multi-objective study (Optuna cannot prune one)."""
        return self.outcome.baseline is None and self.s.pruner.get("name") != "none" and not self.s.multi_objective

    @property
    def told(self) -> float | list[float] | None:
        """What Optuna is told for a complete trial: the score, or with ``objectives=[score, params]`` the
        score and the network's trainable parameters."""
        if not self.s.multi_objective or self.value is None:
            return self.value
        return [self.value, float(self.n_params)]

    def begin(self) -> bool:
        """Pick the policy (sampled, or the baseline's) and record it; ``False`` when the trial ended at once
        because a complete searched trial already scored these parameters (same seeds, same score)."""
        trial, baseline = self.trial, self.outcome.baseline
        with one_append(trial):  # the parameters, kind and policy: one journal write before training
            if baseline:
                policy = contender_policy(baseline, self.s.pretrained)
                if self.s.space.arch is not None:  # a joint study's baselines train the configured network
                    self.n_params = count_parameters(
                        build_model(self.s.model, self.proxy.data.input_shape, self.proxy.data.num_classes))
                    trial.set_user_attr("model", self.s.model)
                    trial.set_user_attr("n_params", self.n_params)
                    self.outcome.n_params = self.n_params
            elif self.s.space.arch is not None:
                policy = self.sample_joint()
            else:
                policy = self.s.space.sample(trial, self.proxy.layers, self.proxy.pretrained)
            self.outcome.params = dict(trial.params)
            self.outcome.policy = policy.to_dict()
            set_user_attrs(trial, {"kind": "baseline" if baseline else "search", "policy": self.outcome.policy})
        twin = None if baseline else complete_twin(trial)
        if twin is None:
            self.policy = policy
            return True
        self.outcome.seed_scores = list(twin.user_attrs.get("seed_scores") or [])
        set_user_attrs(trial, {"seed_scores": twin.user_attrs.get("seed_scores"), "seeds": twin.user_attrs.get("seeds"),
                               "duplicate_of": twin.number})
        self.end(TrialState.COMPLETE, f"same policy as trial {twin.number}", trial_score(twin))
        return False

    def sample_joint(self) -> InitPolicy:
        """A joint trial: draw the network (pruned at once when over ``arch.max_params``), find its layers,
        and draw a role-based init policy for them; the network goes to the trial's ``model`` attribute."""
        s, p, trial = self.s, self.proxy, self.trial
        cfg = s.space.arch.sample(trial)
        model = build_model(cfg, p.data.input_shape, p.data.num_classes)
        self.n_params = n_params = count_parameters(model)
        trial.set_user_attr("model", cfg)
        trial.set_user_attr("n_params", n_params)
        self.outcome.n_params = n_params
        if s.space.arch.max_params is not None and n_params > s.space.arch.max_params:
            raise optuna.TrialPruned(f"{n_params} parameters, over arch.max_params {s.space.arch.max_params}")
        self.model_cfg = cfg
        self.discovery = discover_layers(model.to(p.device), p.example_x)
        return s.space.sample(trial, self.discovery.layers)

    def init_model(self, i: int, seed: int) -> torch.nn.Module:
        """A fresh proxy initialized as the trial's contender for evaluation seed number ``i``; raises
        ``TrialPruned`` for non-finite weights or (on the first seed) a pre-screen rejection."""
        s, p, trial, outcome = self.s, self.proxy, self.trial, self.outcome
        model = fresh_model(self.model_cfg, p.data, p.device, seed)
        used, learned = init_contender(model, self.policy, baseline=outcome.baseline, seed=seed,
                                       example_x=p.example_x, train_x=p.data.x_train, train_y=p.data.y_train,
                                       train=s.train, layers=self.discovery)
        if learned is not None:  # GradInit/MetaInit: the policy they learned, and what it cost
            passes = trial.user_attrs.get("learned_passes", [0, 0])
            trial.set_user_attr("learned_passes", [passes[0] + learned.forward_passes,
                                                   passes[1] + learned.backward_passes])
            if i == 0:
                outcome.policy = used.to_dict()
                trial.set_user_attr("policy", outcome.policy)
        require_finite(model, f"after init (seed {seed})")
        if i == 0:
            outcome.signals = signal_report(model, p.example_x, p.example_y, loss_fn=p.loss.mean)
            reason = is_degenerate(outcome.signals, low=s.prescreen.low, high=s.prescreen.high)
            if s.prescreen.enabled and reason:
                raise optuna.TrialPruned(f"pre-screen: {reason}")
        return model

    def on_checkpoint(self, i: int) -> Callable[[int, Curve], bool]:
        """The training callback of evaluation seed number ``i``: beat, report the partial score, and ask
        the pruner whether to stop. A trial that already ended stops at once."""
        s, steps = self.s, self.s.train.steps

        def callback(step: int, curve: Curve) -> bool:
            if not self.open:
                return True
            self.heartbeat(self.trial)
            if not self.prunable:
                return False
            self.trial.report(partial_score(curve, s.score.metric, budget=steps, target_acc=s.score.target_acc),
                              i * steps + step)
            return self.trial.should_prune()

        return callback

    def record(self, seed: int, curve: Curve, model: torch.nn.Module) -> None:
        """Keep the seed's curve and score it; raises ``TrialPruned`` for a diverged or stopped run or
        non-finite weights after training."""
        self.outcome.curves.append(curve)
        self.outcome.seeds.append(seed)
        if not self.open:
            return
        if curve.diverged:
            raise optuna.TrialPruned(f"diverged on seed {seed}: {curve.reason}")
        if curve.stopped:
            raise optuna.TrialPruned(f"pruned at step {curve.steps_done} of seed {seed}")
        require_finite(model, f"after training (seed {seed})")
        s = self.s
        self.outcome.seed_scores.append(score(curve, s.score.metric, budget=s.train.steps,
                                              target_acc=s.score.target_acc))

    def conclude(self) -> float:
        """Aggregate the seed scores into the trial's value and end it complete."""
        s, outcome = self.s, self.outcome
        set_user_attrs(self.trial, {"seed_scores": outcome.seed_scores, "seeds": outcome.seeds})
        value = aggregate(outcome.seed_scores, s.score.aggregate, s.score.direction)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"non-finite score {value}")
        self.end(TrialState.COMPLETE, None, value)
        return value

    def end(self, state: TrialState, reason: str | None = None, value: float | None = None) -> None:
        """Record how the trial ended (the first call wins)."""
        if self.state is not None:
            return
        self.state, self.value = state, value
        self.outcome.state = STATE_NAMES[state]
        if reason:
            self.outcome.reason = reason
        if state == TrialState.COMPLETE:
            self.outcome.value = value

    def end_by(self, exc: BaseException) -> None:
        """End the trial as ``exc`` means: pruned; failed with the reason; after SIGINT/SIGTERM failed
        ``interrupted by ...`` and enqueued again, once (not the policy's fault); after CUDA ran out of
        memory failed, with the cache handed back for the next trial."""
        if not self.open:
            return
        if isinstance(exc, optuna.TrialPruned):
            self.end(TrialState.PRUNED, str(exc))
        elif isinstance(exc, KeyboardInterrupt):
            self.end(TrialState.FAIL, interrupt_reason(exc))
            t = self.trial
            safely(enqueue_retry, t.study, t.number, t.params, t.user_attrs, self.outcome.reason)
        elif isinstance(exc, torch.cuda.OutOfMemoryError):
            self.end(TrialState.FAIL, f"CUDA out of memory: {first_line(exc) or type(exc).__name__}")
            release_cuda_memory(exc)
        else:
            self.end(TrialState.FAIL, f"{type(exc).__name__}: {exc}")

    def finish(self) -> None:
        """The trial's duration, and its reason as a user attribute (before Optuna is told)."""
        self.outcome.seconds = time.perf_counter() - self.started
        if self.outcome.reason:
            safely(self.trial.set_user_attr, "reason", self.outcome.reason[:1000])


def require_finite(model: torch.nn.Module, when: str) -> None:
    """Prune the trial when a weight is NaN/inf (an exploding init or run): one host sync when all is well."""
    params = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    if not params or bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
        return
    bad = next(name for name, p in params if not bool(torch.isfinite(p).all()))
    raise optuna.TrialPruned(f"non-finite weights in {bad} {when}")


def release_cuda_memory(exc: BaseException) -> None:
    """After CUDA ran out of memory: drop the failed trial's tensors (held by the traceback's frames), then
    hand the cached blocks back, so the next trial starts with the memory the study started with."""
    traceback.clear_frames(exc.__traceback__)
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def complete_twin(trial: optuna.Trial) -> FrozenTrial | None:
    """A complete searched trial of the same study with exactly these parameters, if any."""
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if other.number != trial.number and other.params == trial.params and not other.user_attrs.get("baseline"):
            return other
    return None
