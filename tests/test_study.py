"""The study end to end: presets compose, tiny studies run, resume, export, and the export applies."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pytest
import torch

import initsearch
from initsearch.cli import run
from initsearch.errors import ConfigError, DataError
from initsearch.init.layers import discover_layers
from initsearch.proxy.models import build_model
from initsearch.search.settings import settings_from_config
from initsearch.search.storage import open_storage
from tests.conftest import PYTHON, TINY, compose_config, subprocess_env

PRESETS = ["digits_mlp", "digits_cnn", "cifar_cnn", "cifar_mlp", "deep_mlp", "deep_cnn_digits", "residual_digits",
           "deep_cnn_cifar", "residual_cifar"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_into_valid_settings(preset):
    cfg = compose_config([], study=preset)
    s = settings_from_config(cfg)
    assert s.study_name == preset
    assert s.n_trials >= 1 and s.train.steps >= 1
    assert s.model["name"] in ("mlp", "cnn", "rescnn")
    assert s.data["name"] == ("cifar10" if "cifar" in preset else "digits")


@pytest.mark.parametrize(("group", "pruner"), [("median", optuna.pruners.MedianPruner),
                                               ("hyperband", optuna.pruners.HyperbandPruner),
                                               ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
                                               ("none", optuna.pruners.NopPruner)])
def test_every_pruner_group_composes_into_its_optuna_pruner(group, pruner):
    from initsearch.search.study import make_pruner

    s = settings_from_config(compose_config([f"pruner={group}"]))
    assert type(make_pruner(s.pruner, s.train.steps * s.score.seeds)) is pruner


def test_default_study_is_digits_mlp_with_hybrid_space_and_baselines():
    s = settings_from_config(compose_config([]))
    assert s.study_name == "digits_mlp" and s.data["name"] == "digits" and s.model["name"] == "mlp"
    assert s.space.name == "hybrid"
    assert set(s.baselines) == {"pytorch_default", "xavier", "he", "lecun", "orthogonal", "lsuv"}


@pytest.mark.parametrize(
    "override, key",
    [
        ("n_trials=0", "n_trials"),
        ("train.lr=-0.1", "train.lr"),
        ("train.optimizer=rmsprop", "train.optimizer"),
        ("model.activation=swish", "model.activation"),
        ("search_space.schemes.relu=[kaiming_normal,he_magic]", "search_space.schemes.relu[1]"),
        ("score.metric=accuracy", "score.metric"),
        ("baselines=[xavier,fancy]", "baselines[1]"),
        ("train.steps=abc", "train.steps"),
        ("seed=-1", "seed"),
    ],
)
def test_bad_values_fail_before_training_naming_the_key(in_tmp, override, key):
    cfg = compose_config(TINY + [override, f"storage={in_tmp}/s.journal"])
    with pytest.raises(ConfigError) as info:
        run(cfg, in_tmp / "out")
    assert str(info.value).startswith(key + ":"), str(info.value)
    assert not (in_tmp / "s.journal").exists()


def _study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(storage))


def test_tiny_study_runs_exports_and_resumes(in_tmp):
    storage = str(in_tmp / "s.journal")
    cfg = compose_config(TINY + [f"storage={storage}", "study_name=tiny"])
    path = run(cfg, in_tmp / "out1")
    assert path.exists() and (in_tmp / "out1" / "trials.csv").exists()
    exported = json.loads(path.read_text())
    assert exported["format"] == "initsearch-policy" and exported["provenance"]["study"] == "tiny"
    assert exported["provenance"]["metric"] == "auc_loss"
    study = _study(storage, "tiny")
    trials = study.get_trials()
    assert len(trials) == 4
    assert sorted(t.user_attrs.get("baseline") or "search" for t in trials) == ["he", "search", "search", "xavier"]
    # resume: more trials, the baselines are not run again
    run(compose_config(TINY + [f"storage={storage}", "study_name=tiny", "n_trials=4"]), in_tmp / "out2")
    trials = _study(storage, "tiny").get_trials()
    assert len(trials) == 6
    assert sum(1 for t in trials if t.user_attrs.get("baseline")) == 2
    # re-running a finished study adds nothing
    run(compose_config(TINY + [f"storage={storage}", "study_name=tiny", "n_trials=4"]), in_tmp / "out3")
    assert len(_study(storage, "tiny").get_trials()) == 6


def test_same_seed_same_trials_and_policy(in_tmp):
    results = []
    for i in range(2):
        storage = str(in_tmp / f"s{i}.journal")
        path = run(compose_config(TINY + [f"storage={storage}", "study_name=det"]), in_tmp / f"out{i}")
        trials = _study(storage, "det").get_trials()
        policy = json.loads(path.read_text())
        policy.pop("provenance")
        results.append(([t.value for t in trials], [t.params for t in trials], policy))
    assert results[0] == results[1]


def test_export_cli_and_apply_to_the_full_width_model(in_tmp):
    storage = str(in_tmp / "s.journal")
    overrides = TINY + [f"storage={storage}", "study_name=proxy", "model.width_multiplier=0.5", "model.width=32", "model.depth=3"]
    run(compose_config(overrides), in_tmp / "out")
    out = in_tmp / "policy.json"
    proc = subprocess.run(
        [PYTHON, "-m", "initsearch.export", "study_name=proxy", f"storage={storage}", f"out={out}", "trial=2"],
        capture_output=True, text=True, env=subprocess_env(), cwd=in_tmp, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    policy = initsearch.load_policy(out)
    assert policy.provenance["trial"] == 2
    cfg = settings_from_config(compose_config(overrides))
    full = build_model({**cfg.model, "width_multiplier": 1.0}, (20,), 4)
    report = initsearch.apply_policy(full, out, example_batch=torch.randn(64, 20), seed=0)
    assert [r.name for r in report.layers] == ["fc1", "fc2", "out"]
    assert all(r.rule is not None for r in report.layers)  # every layer matched by name at full width
    assert full.fc1.weight.shape == (32, 20)


def test_export_cli_errors_are_one_line(in_tmp):
    proc = subprocess.run(
        [PYTHON, "-m", "initsearch.export", "study_name=nothing", f"storage={in_tmp}/none.journal"],
        capture_output=True, text=True, env=subprocess_env(), cwd=in_tmp, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "storage" in proc.stderr


def test_cli_runs_end_to_end_and_bad_override_is_one_line(in_tmp):
    env = subprocess_env()
    ok = subprocess.run([PYTHON, "-m", "initsearch", *TINY, "study_name=cli"], capture_output=True, text=True, env=env, cwd=in_tmp, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "best found vs best baseline" in ok.stdout and "best policy:" in ok.stdout
    assert (in_tmp / "initsearch.journal").exists()
    bad = subprocess.run([PYTHON, "-m", "initsearch", *TINY, "study_name=bad", "n_trials=0", "storage=bad.journal"],
                         capture_output=True, text=True, env=env, cwd=in_tmp, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "initsearch: error: n_trials: must be a whole number >= 1, got 0"
    assert not (in_tmp / "bad.journal").exists()


def test_multirun_sweeps_one_study_per_value(in_tmp):
    """``-m`` with a comma sweep is Hydra's multirun: one job per value, each its own study here."""
    args = ["-m"] + [o for o in TINY if not o.startswith(("n_trials=", "baselines="))] + [
        "n_trials=1", "baselines=[]", "select.top_k=0", "seed=0,1", "study_name=sweep${seed}", "progress=false"]
    proc = subprocess.run([PYTHON, "-m", "initsearch", *args], capture_output=True, text=True, env=subprocess_env(),
                          cwd=in_tmp, timeout=300)
    assert proc.returncode == 0, proc.stderr
    storage = open_storage(str(in_tmp / "initsearch.journal"))
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(storage)) == ["sweep0", "sweep1"]
    assert len(list((in_tmp / "multirun").glob("*/*/[01]/best_policy.json"))) == 2


def test_learned_baselines_run_as_trials_and_count_their_passes(in_tmp):
    storage = str(in_tmp / "s.journal")
    overrides = TINY + [f"storage={storage}", "study_name=learned", "baselines=[he,gradinit,metainit]", "n_trials=1"]
    run(compose_config(overrides), in_tmp / "out")
    trials = {t.user_attrs.get("baseline"): t for t in _study(storage, "learned").get_trials()}
    for name in ("gradinit", "metainit"):
        t = trials[name]
        assert t.state.name == "COMPLETE", t.user_attrs.get("reason")
        forward, backward = t.user_attrs["learned_passes"]
        assert forward > 0 and backward > forward
        policy = initsearch.load_policy(t.user_attrs["policy"])
        assert any(rule.init.scale != 1.0 for rule in policy.rules)  # the learned scales, as a policy
    assert "learned_passes" not in trials["he"].user_attrs


def test_cifar_cnn_study_downloads_verifies_and_runs_from_a_loopback_archive(in_tmp):
    from tests.cifar_fixture import make_cifar_archive, serve_directory

    served = in_tmp / "served"
    served.mkdir()
    archive, md5 = make_cifar_archive(served, n_per_batch=40)
    root = in_tmp / "data"
    common = ["study=cifar_cnn", "n_trials=2", "baselines=[he]", "score.seeds=1", "train.steps=10", "train.eval_every=5",
              "train.batch_size=16", "data.subset=100", "model.width_multiplier=0.125", "tracking_uri=none", f"data.root={root}"]
    with serve_directory(served) as base:
        url = f"{base}/{Path(archive).name}"
        wrong = compose_config(common + [f"data.url={url}", "data.md5=" + "0" * 32, f"storage={in_tmp}/bad.journal"])
        with pytest.raises(DataError, match="md5"):
            run(wrong, in_tmp / "bad")
        assert not (root / "cifar-10-batches-py").exists() and not (in_tmp / "bad.journal").exists()
        good = compose_config(common + [f"data.url={url}", f"data.md5={md5}", f"storage={in_tmp}/s.journal"])
        path = run(good, in_tmp / "out")
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    trials = _study(str(in_tmp / "s.journal"), "cifar_cnn").get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    assert initsearch.load_policy(path).provenance["data"] == "cifar10"


@pytest.mark.parametrize("batch", [1, 2])
def test_searched_trials_report_to_the_pruner_only_when_there_is_one(in_tmp, batch):
    reported = {}
    for pruner in ("hyperband", "median", "none"):
        storage = str(in_tmp / f"{pruner}{batch}.journal")
        run(compose_config(TINY + [f"storage={storage}", f"study_name=p{batch}", f"pruner={pruner}",
                                   f"batch_trials={batch}", "n_trials=3"]), in_tmp / f"out-{pruner}{batch}")
        trials = _study(storage, f"p{batch}").get_trials()
        reported[pruner] = sorted(len(t.intermediate_values) for t in trials if not t.user_attrs.get("baseline")
                                  and "duplicate_of" not in t.user_attrs)
    assert reported["median"] and all(n == 2 for n in reported["median"])  # 20 steps, a checkpoint every 10
    assert reported["hyperband"] and all(1 <= n <= 2 for n in reported["hyperband"])  # it may stop one at step 10
    assert reported["none"] and all(n == 0 for n in reported["none"])


@pytest.mark.parametrize("preset", ["deep_cnn_digits", "residual_digits", "deep_cnn_cifar", "residual_cifar"])
def test_deep_and_residual_presets_are_unnormalized_and_deep(preset):
    """The deep plain presets have >= 16 convs and no skip; the residual ones have a branch end per block;
    none has a norm layer."""
    s = settings_from_config(compose_config([], study=preset))
    shape = (3, 32, 32) if "cifar" in preset else (1, 8, 8)
    model = build_model(s.model, shape, 10)
    layers = discover_layers(model, torch.randn(2, *shape)).layers
    convs = [layer for layer in layers if layer.family == "conv"]
    ends = [layer.name for layer in layers if layer.branch_last]
    assert not any(layer.family == "norm" for layer in layers)
    if preset.startswith("deep"):
        assert len(convs) >= 16 and not ends
    else:
        blocks = len(s.model["channels"]) * s.model["blocks_per_stage"]
        assert len(ends) == blocks >= 8 and all(name.endswith("conv2") for name in ends)


def test_resuming_with_other_scheme_choices_is_one_line_and_writes_nothing(in_tmp):
    """Optuna refuses a categorical parameter whose choices changed (every new trial would fail): a study
    resumed with a space that offers other schemes stops at once, naming the parameter."""
    storage = str(in_tmp / "s.journal")
    base = TINY + [f"storage={storage}", "study_name=space", "search_space=grouped"]
    run(compose_config(base), in_tmp / "out")
    before = len(_study(storage, "space").get_trials())
    with pytest.raises(ConfigError, match=r"^search_space: study 'space' searched scheme:\S+ over \[.*\], and this "
                                          r"command's space offers \['kaiming_normal', 'orthogonal'\]; give the new "
                                          r"study a name of its own"):
        run(compose_config(base + ["n_trials=4", "search_space.schemes.relu=[kaiming_normal,orthogonal]"]),
            in_tmp / "out2")
    assert len(_study(storage, "space").get_trials()) == before
    run(compose_config(base + ["n_trials=3"]), in_tmp / "out3")  # the same space resumes
    assert len(_study(storage, "space").get_trials()) == before + 1


@pytest.mark.parametrize("override, key, old, new", [
    ("model.width=32", "model.width", 16, 32),
    ("train.steps=30", "train.steps", 20, 30),
    ("train.lr=0.2", "train.lr", 0.05, 0.2),
    ("score.seeds=3", "score.seeds", 1, 3),
    ("data.synthetic.n_train=256", "data.synthetic.n_train", 512, 256),
    ("seed=1", "seed", 0, 1),
])
def test_resuming_under_other_scoring_settings_is_one_line_and_writes_nothing(in_tmp, monkeypatch, override, key,
                                                                              old, new):
    """Scores taken on another network, data, seed or training run do not compare with the study's: resuming
    under them stops at once, naming the setting; what only says how to run (n_trials, the pruner) resumes."""
    storage = str(in_tmp / "s.journal")
    base = TINY + [f"storage={storage}", "study_name=contract", "score.seeds=1"]
    run(compose_config(base), in_tmp / "out")
    before = len(_study(storage, "contract").get_trials())

    def too_late(*args, **kwargs):
        raise AssertionError("the thread count was measured before the refusal")

    with monkeypatch.context() as patch:  # refused before the thread probe, the tracker and helper workers
        patch.setattr("initsearch.cli.choose_threads", too_late)
        with pytest.raises(ConfigError) as info:
            run(compose_config(base + ["n_trials=3", override]), in_tmp / "out2")
    assert str(info.value).startswith(f"{key}: study 'contract' was run with {old!r}, this command has {new!r}; ")
    assert str(info.value).endswith("or resume_check=false to resume anyway") and "\n" not in str(info.value)
    assert len(_study(storage, "contract").get_trials()) == before
    # what changes only float rounding, or a setting the metric does not read, resumes
    run(compose_config(base + ["n_trials=3", "pruner=none", "train.eval_batch_size=7", "train.bf16=false",
                               "score.target_acc=0.5"]), in_tmp / "out3")
    assert len(_study(storage, "contract").get_trials()) == before + 1
    run(compose_config(base + ["n_trials=4", "train.lr=0.2", "resume_check=false"]), in_tmp / "out4")  # the way past
    assert len(_study(storage, "contract").get_trials()) == before + 2


def test_the_scoring_check_compares_only_what_both_sides_recorded(in_tmp):
    """A study recorded by another version (a key it did not have, one it had and this version has not)
    resumes on the keys both have; one recorded before the check existed records them on its next start."""
    storage = str(in_tmp / "s.journal")
    base = TINY + [f"storage={storage}", "study_name=older", "score.seeds=1"]
    run(compose_config(base), in_tmp / "out")
    study = _study(storage, "older")
    recorded = dict(study.user_attrs["scoring"])
    recorded["train"] = {k: v for k, v in recorded["train"].items() if k != "loss"} | {"retired_key": 3}
    study.set_user_attr("scoring", recorded)
    run(compose_config(base + ["n_trials=3"]), in_tmp / "out2")
    with pytest.raises(ConfigError, match=r"^train\.steps: study 'older' was run with 20, this command has 30; "):
        run(compose_config(base + ["n_trials=4", "train.steps=30"]), in_tmp / "out3")
    study.set_user_attr("scoring", None)  # as before this check
    run(compose_config(base + ["n_trials=4", "train.steps=30"]), in_tmp / "out4")  # nothing to compare: resumes
    assert _study(storage, "older").user_attrs["scoring"]["train"]["steps"] == 30  # and records this start's
