"""Tests for initsearch.proxy.train: determinism, learning, divergence, checkpoints, callback, optimizers, warmup."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initsearch.errors import ConfigError, DataError
from initsearch.proxy.models import MLP
from initsearch.proxy.optimizers import FusedSGD
from initsearch.proxy.train import Curve, TrainConfig, divergence_reason, evaluate, make_optimizer, train_run
from tests.conftest import TensorData, teacher_data

DATA = teacher_data((10,))


def small_mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(DATA.input_shape, DATA.num_classes, depth=2, width=32, dropout=dropout)


FAST = TrainConfig(steps=60, batch_size=32, lr=0.1, eval_every=20)


def test_same_seed_gives_the_same_curve_bit_for_bit() -> None:
    a = train_run(small_mlp(dropout=0.2), DATA, FAST, seed=3)
    b = train_run(small_mlp(dropout=0.2), DATA, FAST, seed=3)
    assert np.array_equal(a.train_loss, b.train_loss)
    assert (a.val_steps, a.val_loss, a.val_acc) == (b.val_steps, b.val_loss, b.val_acc)


def test_different_seed_gives_a_different_curve() -> None:
    a = train_run(small_mlp(), DATA, FAST, seed=3)
    b = train_run(small_mlp(), DATA, FAST, seed=4)
    assert not np.array_equal(a.train_loss, b.train_loss)


def test_dropout_draws_from_the_seeded_rng_and_the_callers_rng_is_untouched() -> None:
    model_a, model_b = small_mlp(dropout=0.5), small_mlp(dropout=0.5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = train_run(model_a, DATA, FAST, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # a different global state before the run must not matter
    b = train_run(model_b, DATA, FAST, seed=3)
    assert np.array_equal(a.train_loss, b.train_loss)


def test_a_small_mlp_learns_the_teacher_problem() -> None:
    cfg = TrainConfig(steps=200, batch_size=64, lr=0.1, eval_every=50)
    curve = train_run(small_mlp(), DATA, cfg, seed=0)
    assert curve.steps_done == 200 and not curve.diverged and not curve.stopped and curve.reason is None
    assert curve.train_loss.dtype == np.float64 and curve.train_loss.shape == (200,)
    assert curve.train_loss[-20:].mean() < 0.5 * curve.train_loss[:10].mean()
    assert curve.val_acc[-1] > 0.8
    assert curve.val_loss[-1] < curve.val_loss[0]
    assert curve.seconds > 0


def test_checkpoints_at_multiples_of_eval_every_and_at_the_last_step() -> None:
    curve = train_run(small_mlp(), DATA, TrainConfig(steps=130, batch_size=16, eval_every=50), seed=0)
    assert curve.val_steps == [50, 100, 130]
    assert len(curve.val_loss) == len(curve.val_acc) == 3
    assert all(0.0 <= acc <= 1.0 for acc in curve.val_acc)
    assert all(math.isfinite(v) and v > 0 for v in curve.val_loss)
    short = train_run(small_mlp(), DATA, TrainConfig(steps=30, batch_size=16, eval_every=50), seed=0)
    assert short.val_steps == [30] and short.steps_done == 30


def test_validation_numbers_match_a_direct_computation_and_train_mode_is_restored() -> None:
    model = small_mlp()
    loss, acc = evaluate(model, DATA.x_val, DATA.y_val, batch_size=7)  # chunks that do not divide 256
    with torch.no_grad():
        logits = model(DATA.x_val)
    assert loss == pytest.approx(F.cross_entropy(logits, DATA.y_val).item(), rel=1e-5)
    assert acc == pytest.approx((logits.argmax(1) == DATA.y_val).float().mean().item())
    assert model.training


def test_huge_lr_diverges_without_raising() -> None:
    cfg = TrainConfig(steps=200, batch_size=32, lr=1e4, eval_every=10)
    curve = train_run(small_mlp(), DATA, cfg, seed=0)
    assert curve.diverged and not curve.stopped
    assert curve.steps_done < 200 and len(curve.train_loss) == curve.steps_done
    assert re.fullmatch(r"loss is (nan|inf|-inf) at step \d+|loss \S+ > 10 x initial \S+ at step \d+", curve.reason)


def test_huge_weights_diverge_without_raising() -> None:
    # Depth 3: logits ~1e17 at step 1, the first update overflows. (A 2-layer net x1e6 starts at loss ~2e11
    # and then decreases: by the relative rule that is a bad start, not divergence.)
    torch.manual_seed(0)
    model = MLP(DATA.input_shape, DATA.num_classes, depth=3, width=32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e6)
    curve = train_run(model, DATA, TrainConfig(steps=100, batch_size=32, eval_every=10), seed=0)
    assert curve.diverged and curve.steps_done < 100 and curve.reason


def test_divergence_is_checked_before_evaluating_and_no_callback_is_called() -> None:
    calls: list[int] = []
    cfg = TrainConfig(steps=100, batch_size=32, lr=1e4, eval_every=100)
    curve = train_run(small_mlp(), DATA, cfg, seed=0, on_checkpoint=lambda step, c: calls.append(step) or False)
    assert curve.diverged and curve.steps_done == 100 and curve.val_steps == [] and calls == []


def test_divergence_reason_rules() -> None:
    assert divergence_reason(np.array([2.3, 2.0, np.nan, np.inf]), 11, 2.3, 10.0) == "loss is nan at step 13"
    assert divergence_reason(np.array([2.3, np.inf]), 1, 2.3, 10.0) == "loss is inf at step 2"
    assert divergence_reason(np.array([20.0, 30.0]), 49, 2.3, 10.0) == "loss 25 > 10 x initial 2.3 at step 50"
    assert divergence_reason(np.array([20.0, 22.0]), 49, 2.3, 10.0) is None  # mean 21 <= 23


def test_callback_sees_partial_curves_and_can_stop_the_run() -> None:
    seen: list[tuple[int, int, int, list[int]]] = []

    def on_checkpoint(step: int, curve: Curve) -> bool:
        seen.append((step, curve.steps_done, len(curve.train_loss), list(curve.val_steps)))
        return step >= 40

    curve = train_run(small_mlp(), DATA, TrainConfig(steps=100, batch_size=16, eval_every=20), seed=0,
                      on_checkpoint=on_checkpoint)
    assert seen == [(20, 20, 20, [20]), (40, 40, 40, [20, 40])]
    assert curve.stopped and not curve.diverged
    assert curve.reason == "stopped by callback at step 40"
    assert curve.steps_done == 40 and curve.val_steps == [20, 40] and len(curve.train_loss) == 40


def test_callback_returning_false_lets_the_run_finish() -> None:
    curve = train_run(small_mlp(), DATA, FAST, seed=0, on_checkpoint=lambda step, c: False)
    assert curve.steps_done == FAST.steps and not curve.stopped


@pytest.mark.parametrize(("name", "cls"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                           ("adamw", torch.optim.AdamW)])
def test_all_optimizers_run_and_learn(name: str, cls: type) -> None:
    lr = 0.1 if name == "sgd" else 0.01
    cfg = TrainConfig(steps=100, batch_size=32, lr=lr, optimizer=name, weight_decay=1e-4, eval_every=50)
    model = small_mlp()
    opt = make_optimizer(model, cfg)
    assert type(opt) is cls
    if name == "sgd":
        assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is False
    else:
        assert opt.defaults["betas"] == (0.9, 0.999)
    curve = train_run(model, DATA, cfg, seed=0)
    assert not curve.diverged and curve.steps_done == 100
    assert curve.train_loss[-20:].mean() < curve.train_loss[:10].mean()


def test_warmup_lr_schedule() -> None:
    cfg = TrainConfig(lr=0.5, warmup_steps=4)
    assert [cfg.lr_at(t) for t in range(1, 7)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5])
    assert TrainConfig(lr=0.5).lr_at(1) == 0.5


def _first_step_change(warmup_steps: int) -> float:
    torch.manual_seed(0)
    model = nn.Linear(10, 3)
    before = model.weight.detach().clone()
    train_run(model, DATA, TrainConfig(steps=1, batch_size=32, lr=1.0, warmup_steps=warmup_steps), seed=0)
    return (model.weight.detach() - before).norm().item()


def test_warmup_starts_near_zero() -> None:
    without, with_warmup = _first_step_change(0), _first_step_change(999)
    assert without > 0 and with_warmup > 0
    assert with_warmup / without == pytest.approx(1 / 1000, rel=1e-3)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"steps": 0}, "train.steps"),
        ({"batch_size": 0}, "train.batch_size"),
        ({"lr": 0.0}, "train.lr"),
        ({"lr": float("inf")}, "train.lr"),
        ({"lr": float("nan")}, "train.lr"),
        ({"optimizer": "rmsprop"}, "train.optimizer"),
        ({"momentum": 1.0}, "train.momentum"),
        ({"momentum": -0.1}, "train.momentum"),
        ({"weight_decay": -1e-4}, "train.weight_decay"),
        ({"warmup_steps": -1}, "train.warmup_steps"),
        ({"eval_every": 0}, "train.eval_every"),
        ({"eval_batch_size": 0}, "train.eval_batch_size"),
        ({"divergence_factor": 1.0}, "train.divergence_factor"),
    ],
)
def test_validate_names_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(**overrides).validate()
    assert str(info.value).startswith(key + ":")


def test_train_run_validates_its_config() -> None:
    with pytest.raises(ConfigError, match="train.steps"):
        train_run(small_mlp(), DATA, TrainConfig(steps=0), seed=0)


def test_from_mapping_refuses_unknown_keys_and_validates() -> None:
    assert TrainConfig.from_mapping({"steps": 5, "optimizer": "adam"}) == TrainConfig(steps=5, optimizer="adam")
    with pytest.raises(ConfigError, match=r"^train\.stepz:"):
        TrainConfig.from_mapping({"stepz": 5})
    with pytest.raises(ConfigError, match=r"^train\.lr:"):
        TrainConfig.from_mapping({"lr": -1.0})


def test_empty_data_is_refused() -> None:
    empty = TensorData(DATA.x_train[:0], DATA.y_train[:0], DATA.x_val, DATA.y_val, 3, (10,))
    with pytest.raises(DataError):
        train_run(small_mlp(), empty, FAST, seed=0)


def test_curve_to_dict_is_strict_json_and_round_trips() -> None:
    curve = Curve(train_loss=np.array([2.0, np.nan, 1.0]), val_steps=[3], val_loss=[1.5], val_acc=[0.25],
                  steps_done=3, diverged=True, reason="loss is nan at step 2", seconds=0.5)
    d = curve.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert d["train_loss"] == [2.0, None, 1.0]
    back = Curve.from_dict(json.loads(text))
    np.testing.assert_array_equal(back.train_loss, curve.train_loss)  # NaN == NaN here
    assert (back.val_steps, back.val_loss, back.val_acc, back.steps_done) == ([3], [1.5], [0.25], 3)
    assert back.diverged and back.reason == curve.reason and back.seconds == 0.5


def test_batches_are_the_per_step_draws_of_the_seeded_generator_and_the_optimizer_is_fused(monkeypatch) -> None:
    """Drawn a segment at a time, the batches are exactly one randint((batch,)) per step, in order; every step
    is the fused kernel's (``FusedSGD``), not torch.optim's."""
    n = 50
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)  # example i carries the value i
    data = TensorData(x, torch.zeros(n, dtype=torch.long), x[:4], torch.zeros(4, dtype=torch.long), 2, (1,))
    model = nn.Sequential(nn.Linear(1, 2))
    seen: list[torch.Tensor] = []
    model.register_forward_hook(lambda m, args, out: seen.append(args[0][:, 0].long().clone()) if m.training else None)
    steps: list[object] = []
    original = FusedSGD.step
    monkeypatch.setattr(FusedSGD, "step", lambda self: (steps.append(type(self)), original(self))[1])
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: steps.append(type(self)))
    train_run(model, data, TrainConfig(steps=7, batch_size=5, lr=1e-6, eval_every=3), seed=9)
    gen = torch.Generator().manual_seed(9)
    expected = [torch.randint(0, n, (5,), generator=gen) for _ in range(7)]
    assert len(seen) == 7 and all(torch.equal(a, b) for a, b in zip(seen, expected))
    assert steps == [FusedSGD] * 7


def test_a_model_with_sparse_embedding_gradients_trains_with_the_plain_optimizer() -> None:
    """Fused optimizers refuse sparse gradients; train_run must keep the plain SGD for such models."""
    n = 64
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (n, 3), generator=g)
    y = (x[:, 0] % 2).long()
    data = TensorData(x, y, x[:8], y[:8], 2, (3,))
    model = nn.Sequential(nn.Embedding(20, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    curve = train_run(model, data, TrainConfig(steps=6, batch_size=8, lr=0.1, momentum=0.0, eval_every=3), seed=0)
    assert curve.steps_done == 6 and np.isfinite(curve.train_loss).all()
