"""Population training: each member's curve is the curve of training it alone; members are independent."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import initsearch.proxy.population as population
from initsearch.proxy.losses import resolve_loss
from initsearch.proxy.models import CNN, MLP, ResCNN
from initsearch.proxy.optimizers import FusedAdam, FusedSGD
from initsearch.proxy.population import choose_mode, draw_indices, static_blocker, train_population
from initsearch.proxy.train import Curve, TrainConfig, make_optimizer, train_run
from tests.conftest import TensorData, teacher_data

VEC = teacher_data((10,), n_train=256, n_val=96)
IMG = teacher_data((3, 6, 6), n_train=128, n_val=48)
SEEDS = [11, 12, 13]


def members(make, count: int = 3) -> list[nn.Module]:
    """``count`` models of one architecture with different initial weights."""
    out = []
    for i in range(count):
        torch.manual_seed(100 + i)
        out.append(make())
    return out


def solo(models: list[nn.Module], data: TensorData, cfg: TrainConfig, seeds: list[int], callbacks=None) -> list[Curve]:
    callbacks = callbacks or [None] * len(models)
    return [train_run(m, data, cfg, seed=s, on_checkpoint=cb) for m, s, cb in zip(models, seeds, callbacks)]


def assert_same_curve(a: Curve, b: Curve, tol: float = 1e-4) -> None:
    assert a.steps_done == b.steps_done and a.val_steps == b.val_steps
    assert (a.diverged, a.stopped, a.reason) == (b.diverged, b.stopped, b.reason)
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=tol, atol=tol)
    np.testing.assert_allclose(a.val_loss, b.val_loss, rtol=tol, atol=tol)
    np.testing.assert_allclose(a.val_acc, b.val_acc, atol=1.5 / 48)  # at most one example may flip


def assert_same_weights(a: nn.Module, b: nn.Module, tol: float = 1e-4) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol, msg=name)


def run_both(make, data: TensorData, cfg: TrainConfig, seeds=SEEDS, prepare=None, callbacks=None, mode="auto",
             engine=None):
    """The population's curves and the solo runs' curves (and both sets of models); the population must have
    run on ``engine`` (default: the ``mode`` insisted on)."""
    models = members(make, len(seeds))
    if prepare is not None:
        prepare(models)
    copies = [copy.deepcopy(m) for m in models]
    result = train_population(models, data, cfg, seeds=seeds, on_checkpoint=callbacks, mode=mode)
    expected = engine or (mode if mode != "auto" else None)
    assert expected is not None, "say which engine an auto population must run on"
    assert result.engine == expected, (result.engine, result.reason)
    alone = solo(copies, data, cfg, seeds, callbacks)
    return result.curves, alone, models, copies


@pytest.mark.parametrize("optimizer, lr, wd", [("sgd", 0.05, 1e-3), ("adam", 0.01, 0.0), ("adamw", 0.01, 0.05)])
def test_mlp_members_match_solo_runs_for_every_optimizer(optimizer, lr, wd):
    cfg = TrainConfig(steps=40, batch_size=16, lr=lr, optimizer=optimizer, weight_decay=wd, warmup_steps=5,
                      eval_every=15)
    together, alone, models, copies = run_both(lambda: MLP((10,), 3, depth=3, width=16), VEC, cfg, engine="stacked")
    for a, b, m, c in zip(together, alone, models, copies):
        assert_same_curve(a, b)
        assert_same_weights(m, c)  # the models were trained in place, like train_run does
    assert not np.allclose(together[0].train_loss, together[1].train_loss)  # the members really differ


def test_engines_are_chosen_by_architecture():
    assert choose_mode([MLP((10,), 3, norm="batch")] * 2) == ("stacked", None)
    for device in ("cpu", "cuda"):  # plain Sequential CNNs: the stacked engine (grouped convolutions)
        assert choose_mode([CNN((3, 6, 6), 3, channels=[4], norm="batch")] * 2, device=device) == ("stacked", None)
    for device in ("cpu", "cuda"):  # the residual proxy too: its blocks run as units on the stacked engine
        assert choose_mode([ResCNN((3, 6, 6), 3, channels=[4], norm="batch")] * 2, device=device) == ("stacked", None)
    assert choose_mode([ResCNN((3, 6, 6), 3, channels=[4])] * 2, mode="vmap", device="cpu") == ("vmap", None)
    assert choose_mode([Residual()] * 2, device="cuda") == ("vmap", None)  # any other module: vmap on CUDA
    assert choose_mode([Residual()] * 2, device="cpu")[0] == "loop"  # where vmap was slower than one at a time
    assert choose_mode([CNN((3, 6, 6), 3, channels=[4])] * 2, mode="vmap", device="cpu") == ("vmap", None)
    assert choose_mode([MLP((10,), 3)]) == ("loop", "a single member")
    with pytest.raises(ValueError, match="stacked engine"):
        choose_mode([Residual()] * 2, mode="stacked")
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="grouped"):
        choose_mode([grouped] * 2, mode="stacked")


# Which engine really ran, for every optimizer and proxy kind: ``train_run`` is watched, so a population that
# fell back to one-at-a-time training (silently, in ``auto``) fails here, whatever its curves.
KINDS = {
    "mlp": (lambda: MLP((3, 6, 6), 3, depth=3, width=12), "stacked"),
    "cnn": (lambda: CNN((3, 6, 6), 3, channels=[4, 6], fc_width=5), "stacked"),
    "cnn_batchnorm": (lambda: CNN((3, 6, 6), 3, channels=[4, 6], norm="batch"), "stacked"),
    "rescnn": (lambda: ResCNN((3, 6, 6), 3, channels=[4, 6], blocks_per_stage=2), "stacked"),
    "other_module": (lambda: Residual(), "loop"),  # auto on the CPU: one at a time
}


class Residual(nn.Module):
    """A user's own module with a skip connection: neither a Sequential nor the ResCNN proxy."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.out = nn.Linear(3 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.conv(x) + x).flatten(1))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("seeds", [[7, 7, 7], [7, 8, 9]])
def test_the_engine_that_ran_is_reported_for_every_optimizer_and_model_kind(optimizer, kind, seeds, monkeypatch):
    make, engine = KINDS[kind]
    cfg = TrainConfig(steps=8, batch_size=8, lr=0.01, optimizer=optimizer, weight_decay=0.01, eval_every=4,
                      eval_batch_size=32)
    models = members(make, len(seeds))
    copies = [copy.deepcopy(m) for m in models]
    solo_calls = []
    real_train_run = population.train_run
    monkeypatch.setattr(population, "train_run", lambda *a, **kw: solo_calls.append(1) or real_train_run(*a, **kw))
    result = train_population(models, IMG, cfg, seeds=seeds)
    monkeypatch.undo()
    assert result.engine == engine, result.reason
    assert len(solo_calls) == (len(models) if engine == "loop" else 0)
    assert (result.reason is None) == (engine != "loop")
    for a, b, m, c in zip(result.curves, solo(copies, IMG, cfg, seeds), models, copies):
        assert_same_curve(a, b)
        assert_same_weights(m, c)


@pytest.mark.parametrize("mode", ["stacked", "vmap"])
def test_mlp_with_batchnorm_and_layernorm_match_solo_runs(mode):
    cfg = TrainConfig(steps=30, batch_size=16, lr=0.05, eval_every=10)
    for norm in ("batch", "layer"):
        together, alone, models, copies = run_both(lambda: MLP((10,), 3, depth=3, width=12, norm=norm), VEC, cfg,
                                                   mode=mode)
        for a, b, m, c in zip(together, alone, models, copies):
            assert_same_curve(a, b)
            assert_same_weights(m, c)  # BatchNorm running statistics included


# CNNs with BatchNorm: running statistics, and for the residual proxy a projection shortcut. Not AdamW: one of
# the residual proxy's conv weights gets a gradient of about 1e-8, Adam's epsilon, on these seeds, so the first
# update of that one weight depends on the gradient's last bits, on either engine (measured: 1e-3 apart).
BATCHNORM_CNNS = {"cnn": (lambda: CNN((3, 6, 6), 3, channels=[4, 6], norm="batch"), "norm1"),
                  "rescnn": (lambda: ResCNN((3, 6, 6), 3, channels=[4, 6], norm="batch"), "stem_norm")}


@pytest.mark.parametrize("mode", ["stacked", "vmap"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("seeds", [[1, 2], [1, 1]])
@pytest.mark.parametrize("kind", sorted(BATCHNORM_CNNS))
def test_cnns_with_batchnorm_match_solo_runs(kind, mode, optimizer, seeds):
    make, norm = BATCHNORM_CNNS[kind]
    cfg = TrainConfig(steps=20, batch_size=8, lr=0.05 if optimizer == "sgd" else 0.01, optimizer=optimizer,
                      eval_every=10, eval_batch_size=32)
    together, alone, models, copies = run_both(make, IMG, cfg, seeds=seeds, mode=mode)
    for a, b, m, c in zip(together, alone, models, copies):
        assert_same_curve(a, b)
        assert_same_weights(m, c)
    untrained = members(make, 1)[0]
    assert not torch.equal(models[0].get_buffer(f"{norm}.running_mean"), untrained.get_buffer(f"{norm}.running_mean"))


def test_plain_cnn_and_residual_cnn_match_solo_runs():
    cfg = TrainConfig(steps=12, batch_size=8, lr=0.02, eval_every=6, eval_batch_size=32)
    cases = [(lambda: CNN((3, 6, 6), 3, channels=[4, 6]), "stacked"), (lambda: CNN((3, 6, 6), 3, channels=[4, 6]), "vmap"),
             (lambda: ResCNN((3, 6, 6), 3, channels=[4, 6]), "vmap"), (lambda: ResCNN((3, 6, 6), 3, channels=[4, 6]), "stacked")]
    for make, mode in cases:
        together, alone, _, _ = run_both(make, IMG, cfg, seeds=[3, 4], mode=mode)
        for a, b in zip(together, alone):
            assert_same_curve(a, b)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("seeds", [[2, 2, 2], [2, 3, 4]])
def test_stacked_convolutions_match_solo_runs_in_either_memory_layout(channels_last, seeds, monkeypatch):
    """Both layouts the measurement may pick, on an unusual Sequential CNN: a pool on the raw input, a strided
    bias-free conv, BatchNorm2d, average pooling, a 'same'-padded dilated conv, adaptive pooling, a Linear."""
    def make():
        return nn.Sequential(nn.MaxPool2d(1), nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(5),
                             nn.Tanh(), nn.AvgPool2d(1), nn.Conv2d(5, 4, 2, padding="same", dilation=2), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))

    monkeypatch.setattr(population, "_conv_layout", lambda stack, data, cfg: channels_last)
    cfg = TrainConfig(steps=16, batch_size=8, lr=0.02, optimizer="adam", eval_every=8, eval_batch_size=32)
    together, alone, models, copies = run_both(make, IMG, cfg, seeds=seeds, mode="stacked")
    for a, b, m, c in zip(together, alone, models, copies):
        assert_same_curve(a, b)
        assert_same_weights(m, c)


@pytest.mark.parametrize("mode", ["stacked", "vmap"])
def test_a_diverging_member_is_reported_and_does_not_touch_the_others(mode):
    cfg = TrainConfig(steps=40, batch_size=16, lr=0.05, eval_every=10)

    def blow_up(models):  # member 1 starts at a huge scale: its loss explodes
        with torch.no_grad():
            for p in models[1].parameters():
                p.mul_(1e4)

    together, alone, _, _ = run_both(lambda: MLP((10,), 3, depth=3, width=16), VEC, cfg,
                                     prepare=blow_up, mode=mode)
    assert together[1].diverged and together[1].steps_done == 10 and "step" in together[1].reason
    assert together[1].reason == alone[1].reason
    for i in (0, 2):
        assert not together[i].diverged and together[i].steps_done == 40
        assert_same_curve(together[i], alone[i])


def test_a_nan_member_does_not_poison_the_others():
    cfg = TrainConfig(steps=20, batch_size=16, lr=0.05, eval_every=10)

    def poison(models):
        with torch.no_grad():
            models[0].fc1.weight[0, 0] = float("nan")

    together, alone, _, _ = run_both(lambda: MLP((10,), 3, depth=2, width=8), VEC, cfg, prepare=poison,
                                     engine="stacked")
    assert together[0].diverged and "nan" in together[0].reason.lower()
    for i in (1, 2):
        assert_same_curve(together[i], alone[i])
        assert np.isfinite(together[i].train_loss).all()


@pytest.mark.parametrize("mode", ["stacked", "vmap"])
def test_pruning_is_per_member_through_its_own_callback(mode):
    cfg = TrainConfig(steps=30, batch_size=16, lr=0.05, eval_every=10)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def callback(i: int, stop_at: int | None):
        def on_checkpoint(step: int, curve: Curve) -> bool:
            seen[i].append(step)
            assert curve.steps_done == step and len(curve.train_loss) == step
            return stop_at is not None and step >= stop_at
        return on_checkpoint

    models = members(lambda: MLP((10,), 3, depth=2, width=8))
    copies = [copy.deepcopy(m) for m in models]
    result = train_population(models, VEC, cfg, seeds=SEEDS, on_checkpoint=[callback(0, None), callback(1, 10),
                                                                             callback(2, 20)], mode=mode)
    assert result.engine == mode
    together = result.curves
    assert seen == {0: [10, 20, 30], 1: [10], 2: [10, 20]}
    assert [c.steps_done for c in together] == [30, 10, 20]
    assert not together[0].stopped and together[1].stopped and together[2].stopped
    assert together[1].reason == "stopped by callback at step 10"
    alone = solo(copies, VEC, cfg, SEEDS, [None, lambda s, c: s >= 10, lambda s, c: s >= 20])
    for a, b in zip(together, alone):
        assert_same_curve(a, b)


def test_dropout_models_fall_back_to_solo_runs_and_match_them_exactly():
    make = lambda: MLP((10,), 3, depth=2, width=8, dropout=0.3)  # noqa: E731
    assert static_blocker(make()) is not None and choose_mode([make(), make()])[0] == "loop"
    cfg = TrainConfig(steps=20, batch_size=16, lr=0.05, eval_every=10)
    together, alone, _, _ = run_both(make, VEC, cfg, engine="loop")
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a.train_loss, b.train_loss)
    with pytest.raises(ValueError, match="dropout"):
        train_population(members(make, 2), VEC, cfg, seeds=[0, 1], mode="vmap")


def test_cpu_index_plan_is_the_sequence_of_solo_draws():
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    plan = draw_indices(gens, 100, 7, 4, torch.device("cpu"))
    assert plan.shape == (7, 2, 4)
    ref = torch.Generator().manual_seed(6)
    expected = torch.stack([torch.randint(0, 100, (4,), generator=ref) for _ in range(7)])
    assert torch.equal(plan[:, 1], expected)


def test_bad_populations_are_refused():
    cfg = TrainConfig(steps=5, batch_size=8, eval_every=5)
    assert train_population([], VEC, cfg, seeds=[]).curves == []
    with pytest.raises(ValueError, match="differs"):
        train_population([MLP((10,), 3, width=8), MLP((10,), 3, width=9)], VEC, cfg, seeds=[0, 1])
    with pytest.raises(ValueError, match="seeds"):
        train_population([MLP((10,), 3, width=8)] * 2, VEC, cfg, seeds=[0])


# ---- one seed for every member (what batched studies do): one batch per step, the first layer as one matmul ----
def test_shared_seed_population_matches_solo_runs_with_members_leaving_at_different_checkpoints():
    cfg = TrainConfig(steps=40, batch_size=16, lr=0.05, weight_decay=1e-3, warmup_steps=3, eval_every=10)
    seeds = [21] * 4

    def blow_up(models):  # member 3 starts at a huge scale: it diverges at the first checkpoint
        with torch.no_grad():
            for p in models[3].parameters():
                p.mul_(1e4)

    callbacks = [None, lambda s, c: s >= 10, lambda s, c: s >= 30, None]  # member 1 leaves at 10, member 2 at 30
    together, alone, models, copies = run_both(lambda: MLP((10,), 3, depth=3, width=16), VEC, cfg, seeds=seeds,
                                               prepare=blow_up, callbacks=callbacks, mode="stacked")
    assert [c.steps_done for c in together] == [40, 10, 30, 10]
    assert together[3].diverged and together[1].stopped and together[2].stopped
    for a, b, m, c in zip(together, alone, models, copies):
        assert_same_curve(a, b)
    for i in range(3):
        assert_same_weights(models[i], copies[i])  # written back when each left the stack
    assert not np.allclose(together[0].train_loss[:10], together[1].train_loss)  # same batches, own weights


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_shared_seed_population_matches_solo_runs_with_adam(optimizer):
    cfg = TrainConfig(steps=20, batch_size=16, lr=0.01, optimizer=optimizer, weight_decay=0.01, eval_every=10)
    together, alone, models, copies = run_both(lambda: MLP((10,), 3, depth=3, width=16), VEC, cfg, seeds=[4, 4, 4],
                                               engine="stacked")
    for a, b, m, c in zip(together, alone, models, copies):
        assert_same_curve(a, b)
        assert_same_weights(m, c)


@pytest.mark.parametrize("mode", ["stacked", "vmap"])
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_shared_seed_population_with_norms_matches_solo_runs(mode, norm):
    cfg = TrainConfig(steps=20, batch_size=16, lr=0.05, eval_every=10)
    together, alone, models, copies = run_both(lambda: MLP((10,), 3, depth=3, width=12, norm=norm), VEC, cfg,
                                               seeds=[9, 9], mode=mode)
    for a, b, m, c in zip(together, alone, models, copies):
        assert_same_curve(a, b)
        assert_same_weights(m, c)  # BatchNorm running statistics included


@pytest.mark.parametrize("seeds", [[5, 5, 6], [5, 6, 7], [8, 8, 8]])
def test_image_inputs_and_mixed_seeds_on_the_stacked_engine(seeds):
    """Inputs of shape (3, 6, 6) flattened by the model; mixed seeds take the per-member batch path."""
    cfg = TrainConfig(steps=16, batch_size=8, lr=0.05, eval_every=8, eval_batch_size=32)
    together, alone, models, copies = run_both(lambda: MLP((3, 6, 6), 3, depth=3, width=12), IMG, cfg, seeds=seeds,
                                               mode="stacked")
    for a, b, m, c in zip(together, alone, models, copies):
        assert_same_curve(a, b)
        assert_same_weights(m, c)
    if seeds[0] == seeds[1]:  # the same batches, different initial weights: curves differ only by the weights
        assert not np.allclose(together[0].train_loss, together[1].train_loss)


@pytest.mark.parametrize("seeds", [[3, 3], [3, 4]])
def test_unusual_sequentials_match_solo_runs(seeds):
    """A ReLU on the raw input, a ReLU after a Tanh (not fused into a Linear: Tanh's backward needs its
    output), a Linear without bias followed by a ReLU, and a final activation."""
    def make():
        return nn.Sequential(nn.ReLU(), nn.Linear(10, 12), nn.Tanh(), nn.ReLU(), nn.Linear(12, 8, bias=False),
                             nn.ReLU(), nn.Linear(8, 3), nn.Softplus())

    cfg = TrainConfig(steps=20, batch_size=16, lr=0.05, eval_every=10)
    assert choose_mode([make(), make()]) == ("stacked", None)
    together, alone, models, copies = run_both(make, VEC, cfg, seeds=seeds, engine="stacked")
    for a, b, m, c in zip(together, alone, models, copies):
        assert_same_curve(a, b)
        assert_same_weights(m, c)


def test_a_linear_on_unflattened_inputs_falls_back_to_the_loop():
    """Without a Flatten, a Linear sees (C, H, W) examples: not the stacked engine's flat features, so the
    probe sends the population to solo runs (whose curves it then returns)."""
    def make():
        return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 6, 3))

    cfg = TrainConfig(steps=6, batch_size=8, lr=0.05, eval_every=3, eval_batch_size=32)
    with pytest.raises(ValueError, match="flat features"):
        train_population(members(make, 2), IMG, cfg, seeds=[1, 1], mode="stacked")
    together, alone, _, _ = run_both(make, IMG, cfg, seeds=[1, 1], engine="loop")
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a.train_loss, b.train_loss)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_the_stacked_optimizer_is_train_runs_optimizer(optimizer):
    """What ``_build_stack`` really builds: ``training_optimizer``'s fused-kernel class, ``make_optimizer``'s
    hyperparameters, over the stacked parameters."""
    cfg = TrainConfig(optimizer=optimizer, lr=0.02, momentum=0.8, weight_decay=0.1, warmup_steps=2)
    models = members(lambda: MLP((10,), 3, depth=2, width=8), 2)
    stack = population._build_stack(models, [1, 2], cfg, torch.device("cpu"), population._StackedSequential(
        models[0], resolve_loss("auto", VEC.y_train)))
    assert type(stack.optimizer) is (FusedSGD if optimizer == "sgd" else FusedAdam)
    reference = make_optimizer(models[0], cfg)
    assert {k: v for k, v in stack.optimizer.defaults.items() if k in reference.defaults and k not in
            ("fused", "foreach")} == {k: v for k, v in reference.defaults.items() if k in stack.optimizer.defaults
                                      and k not in ("fused", "foreach")}
    assert stack.optimizer.param_groups[0]["params"] == list(stack.params.values())


# ---- the same equivalence on CUDA (skipped without it): the stacked CNN engine, vmap, and the MLP engine ----
@pytest.fixture
def exact_cuda():
    """CUDA with float32 kept float32: torch lets cuDNN convolutions run in TF32 by default, which rounds
    solo and stacked runs differently (to ~1e-3); the equivalence is checked at float32 precision."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on(data: TensorData, device: torch.device) -> TensorData:
    return TensorData(data.x_train.to(device), data.y_train.to(device), data.x_val.to(device), data.y_val.to(device),
                      data.num_classes, data.input_shape)


@pytest.mark.parametrize("kind, engine", [("mlp", "stacked"), ("cnn", "stacked"), ("cnn_batchnorm", "stacked"),
                                          ("rescnn", "stacked"), ("rescnn", "vmap"), ("other_module", "vmap")])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("seeds", [[5, 5, 5], [5, 6, 7]])
def test_populations_match_solo_runs_on_cuda(kind, engine, optimizer, seeds, exact_cuda):
    make = KINDS[kind][0]
    data = on(IMG, exact_cuda)
    cfg = TrainConfig(steps=12, batch_size=8, lr=0.01, optimizer=optimizer, eval_every=6, eval_batch_size=32)
    together, alone, models, copies = run_both(lambda: make().to(exact_cuda), data, cfg, seeds=seeds, engine=engine)
    for a, b, m, c in zip(together, alone, models, copies):
        assert_same_curve(a, b)
        assert_same_weights(m, c)

