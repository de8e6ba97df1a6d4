"""The checkpoint scheme (policy format version 2): weights copied from hash-checked state dict files."""
from __future__ import annotations

import importlib.util
import json
import math
import pickle

import pytest
import torch
from torch import nn

from initsearch.errors import PolicyError
from initsearch.init.apply import apply_policy
from initsearch.init.checkpoints import file_sha256, save_state_dict
from initsearch.init.policy import CheckpointRef, InitPolicy, InitSpec, Rule, load_policy, save_policy


def _net(seed: int = 0, width: int = 16, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def _policy(sha: str, *rules: dict, path: str = "weights/src.pt", **top) -> dict:
    return {"format": "initsearch-policy", "version": 2, "checkpoints": {"src": {"path": path, "sha256": sha}},
            "rules": list(rules), **top}


ALL_FROM_FILE = {"layer": "*", "scheme": "checkpoint", "checkpoint": "src"}


@pytest.fixture
def source(tmp_path):
    """A trained-looking source net saved as a state dict under tmp_path/weights, and its sha256."""
    net = _net(seed=1)
    sha = save_state_dict(net, tmp_path / "weights" / "src.pt")
    return net, sha


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- the file format


def test_version_2_round_trips_and_version_1_stays_version_1(tmp_path, source):
    _, sha = source
    data = _policy(sha, {"position": "last", "scheme": "kaiming_normal"}, {**ALL_FROM_FILE, "key": "x", "scale": 0.5})
    policy = InitPolicy.from_dict(data)
    written = policy.to_dict()
    assert written["version"] == 2 and list(written)[:3] == ["format", "version", "checkpoints"]
    assert written["rules"][1] == {"layer": "*", "scheme": "checkpoint", "scale": 0.5, "checkpoint": "src", "key": "x"}
    assert InitPolicy.from_dict(written) == policy
    plain = InitPolicy.from_dict({"format": "initsearch-policy", "version": 2, "rules": [{"scheme": "zeros"}]})
    assert plain.to_dict()["version"] == 1  # a version 2 file that uses no version 2 feature is written as 1


def test_checkpoint_scheme_defaults_copy_the_bias_and_skip_lsuv():
    spec = InitSpec("checkpoint", checkpoint="src")
    assert spec.bias == "checkpoint" and spec.lsuv is False and spec.to_dict() == {"scheme": "checkpoint", "checkpoint": "src"}
    explicit = InitSpec("checkpoint", checkpoint="src", bias="zeros", lsuv=True)
    assert explicit.bias == "zeros" and explicit.lsuv is True
    assert explicit.to_dict() == {"scheme": "checkpoint", "bias": "zeros", "lsuv": True, "checkpoint": "src"}
    assert InitSpec("kaiming_normal").bias == "zeros" and InitSpec("kaiming_normal").lsuv is True


@pytest.mark.parametrize("data, message", [
    ({"format": "initsearch-policy", "version": 1, "checkpoints": {}, "rules": []}, "checkpoints: a version 2 feature"),
    ({"format": "initsearch-policy", "version": 1, "rules": [{**ALL_FROM_FILE}]}, "rules[0].scheme: checkpoint is a version 2"),
    (_policy("a" * 64, {**ALL_FROM_FILE, "checkpoint": "other"}), "rules[0].checkpoint: unknown checkpoint 'other' (declared: src)"),
    (_policy("a" * 64, {"scheme": "checkpoint"}), "rules[0].checkpoint: required by scheme 'checkpoint'"),
    (_policy("abc", ALL_FROM_FILE), "checkpoints.src.sha256: must be 64 hexadecimal digits"),
    ({**_policy("a" * 64), "checkpoints": {"src": {"path": "x.pt"}}}, "checkpoints.src.sha256: required"),
    ({**_policy("a" * 64), "checkpoints": {"src": {"path": "x.pt", "sha256": "a" * 64, "md5": 1}}},
     "checkpoints.src.md5: unknown key"),
    (_policy("a" * 64, {"scheme": "kaiming_normal", "key": "fc"}), "rules[0].key: not accepted by scheme 'kaiming_normal'"),
    (_policy("a" * 64, {"scheme": "kaiming_normal", "bias": "checkpoint"}), "rules[0].bias: must be one of"),
])
def test_bad_version_2_fields_are_one_line_naming_the_field(data, message):
    with pytest.raises(PolicyError) as err:
        InitPolicy.from_dict(data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_constructed_policy_checks_its_checkpoint_references():
    rule_spec = InitSpec("checkpoint", checkpoint="missing")
    with pytest.raises(PolicyError, match="unknown checkpoint 'missing'"):
        InitPolicy(rules=(Rule(rule_spec),), checkpoints={"src": CheckpointRef("a.pt", "0" * 64)})


# ---------------------------------------------------------------------------------------------- applying


def test_all_layers_from_the_file_reproduce_the_source_network(tmp_path, source, monkeypatch):
    net, sha = source
    policy_file = tmp_path / "policy.json"
    save_policy(_policy(sha, ALL_FROM_FILE), policy_file)
    target = _net(seed=7)
    monkeypatch.chdir(tmp_path.parent)  # the checkpoint path is relative to the policy file, not to the working directory
    report = apply_policy(target, str(policy_file), seed=0)
    assert _same(_state(target), _state(net))
    x = torch.randn(32, 6)
    assert torch.equal(target(x), net(x))  # the same function, not only the same numbers
    assert [r.source for r in report.layers] == ["src:0", "src:2", "src:4"]
    assert report.from_checkpoint() == {str(tmp_path / "weights" / "src.pt"): ["0", "2", "4"]}
    assert f"from {tmp_path / 'weights' / 'src.pt'}: 0, 2, 4" in str(report)


def test_fresh_head_beside_copied_backbone_follows_its_own_scheme(tmp_path, source):
    """The head gets He init (std sqrt(2/fan_in) within sampling error), the backbone the file's exact tensors."""
    net, sha = source
    wide = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    policy = _policy(sha, {"position": "last", "scheme": "kaiming_normal", "gain": 1.0}, ALL_FROM_FILE,
                     path=str(tmp_path / "weights" / "src.pt"))
    stds = []
    for seed in range(40):
        report = apply_policy(wide, policy, seed=seed)
        assert torch.equal(wide[0].weight, net[0].weight) and torch.equal(wide[2].bias, net[2].bias)
        assert torch.all(wide[4].bias == 0)
        stds.append(float(wide[4].weight.detach().std()))
    expected = 1.0 / math.sqrt(16)
    assert abs(sum(stds) / len(stds) - expected) < 0.1 * expected
    assert report.layers[2].source is None and report.layers[2].scheme == "kaiming_normal"


def test_explicit_key_scale_and_bias_options(tmp_path):
    source = nn.Module()
    source.features = nn.Sequential(nn.Linear(6, 16))
    sha = save_state_dict(source, tmp_path / "weights" / "src.pt")
    target = _net(seed=3)
    first_bias = target[0].bias.detach().clone()
    policy = _policy(sha, {"layer": "0", "scheme": "checkpoint", "checkpoint": "src", "key": "features.0",
                           "scale": 2.0, "bias": "keep"}, path=str(tmp_path / "weights" / "src.pt"))
    apply_policy(target, policy)
    assert torch.equal(target[0].weight, 2.0 * source.features[0].weight)
    assert torch.equal(target[0].bias, first_bias)


def test_norm_layer_gets_weight_bias_and_running_statistics(tmp_path):
    def conv_net():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    torch.manual_seed(0)
    source = conv_net()
    source.train()
    source(torch.randn(16, 3, 8, 8) * 3 + 1)  # running statistics away from (0, 1)
    with torch.no_grad():
        source[1].weight.uniform_(0.5, 1.5)
    path = tmp_path / "src.pt"
    sha = save_state_dict(source, path)
    target = conv_net()
    rules = [{"type": "norm", "scheme": "checkpoint", "checkpoint": "src"}, {"scheme": "checkpoint", "checkpoint": "src"}]
    apply_policy(target, _policy(sha, *rules, path=str(path)), example_batch=torch.randn(2, 3, 8, 8))
    assert _same(_state(target), _state(source))


def test_lsuv_leaves_copied_layers_alone_unless_asked(tmp_path, source):
    net, sha = source
    path = str(tmp_path / "weights" / "src.pt")
    lsuv = {"enabled": True, "target_std": 1.0, "tol": 0.05, "max_iter": 20}
    x = torch.randn(256, 6)
    target = _net(seed=5)
    report = apply_policy(target, _policy(sha, {"position": "first", **ALL_FROM_FILE},
                                          {"scheme": "orthogonal"}, path=path, lsuv=lsuv), example_batch=x, seed=0)
    assert torch.equal(target[0].weight, net[0].weight)
    assert report.layers[0].lsuv_iterations is None and report.layers[1].lsuv_iterations is not None
    asked = _net(seed=5)
    apply_policy(asked, _policy(sha, {"position": "first", **ALL_FROM_FILE, "lsuv": True},
                                {"scheme": "orthogonal"}, path=path, lsuv=lsuv), example_batch=x, seed=0)
    assert abs(float(asked[0](x).detach().std()) - 1.0) < 0.05 and not torch.equal(asked[0].weight, net[0].weight)


# ---------------------------------------------------------------------------------------------- refusals


def _refused(tmp_path, policy: dict, model: nn.Module | None = None) -> str:
    """Apply ``policy`` (saved beside tmp_path's weights) and return the one-line error; the model is unchanged."""
    model = model or _net(seed=9)
    before = _state(model)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy), encoding="utf-8")
    with pytest.raises(PolicyError) as err:
        apply_policy(model, str(path), seed=0)
    assert _same(_state(model), before), "a refused policy changed the model"
    message = str(err.value)
    assert "\n" not in message
    return message


def test_wrong_hash_is_refused_before_reading(tmp_path, source):
    message = _refused(tmp_path, _policy("0" * 64, ALL_FROM_FILE))
    assert message.startswith("checkpoints.src.sha256: the file src.pt has sha256 ") and "policy says 000" in message


def test_missing_file_is_refused(tmp_path, source):
    _, sha = source
    assert "checkpoints.src.path: file not found" in _refused(tmp_path, _policy(sha, ALL_FROM_FILE, path="nope.pt"))


def test_missing_key_is_refused(tmp_path, source):
    _, sha = source
    message = _refused(tmp_path, _policy(sha, {**ALL_FROM_FILE, "key": "backbone.0"}))
    assert message.startswith("rules[0].key: layer '0' needs 'backbone.0.weight', which src does not have")


def test_shape_mismatch_names_both_shapes(tmp_path, source):
    _, sha = source
    # the last layer has 3 outputs in the file, 5 in this model; the first two layers fit and would be written
    message = _refused(tmp_path, _policy(sha, ALL_FROM_FILE), model=_net(seed=9, classes=5))
    assert message == "rules[0]: layer '4' weight (5, 16) vs '4.weight' (3, 16) in src"


def test_layer_bias_without_bias_in_file_is_refused(tmp_path):
    source = nn.Sequential(nn.Linear(6, 16, bias=False))
    sha = save_state_dict(source, tmp_path / "weights" / "src.pt")
    message = _refused(tmp_path, _policy(sha, {"layer": "0", **{k: v for k, v in ALL_FROM_FILE.items() if k != "layer"}}))
    assert message.startswith("rules[0].checkpoint: layer '0' needs '0.bias', which src does not have")


class _Payload:
    """Unpickling this with the full unpickler would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_payload_never_runs(tmp_path, writer):
    marker = tmp_path / "payload-ran"
    file = tmp_path / "weights" / "src.pt"
    file.parent.mkdir()
    content = {"0.weight": _Payload(str(marker)), "0.bias": torch.zeros(16)}
    if writer == "torch.save":
        torch.save(content, file)
    else:
        with open(file, "wb") as handle:
            pickle.dump(content, handle)
    # the payload does work when unpickled without restriction (so the test can fail) ...
    with open(file, "rb") as handle:
        if writer == "pickle.dump":
            pickle.load(handle)
            assert marker.exists()
            marker.unlink()
    # ... and apply_policy refuses it without running it
    message = _refused(tmp_path, _policy(file_sha256(file), ALL_FROM_FILE))
    assert message.startswith("checkpoints.src: refused, the file needs pickle beyond tensors")
    assert not marker.exists()


@pytest.mark.parametrize("content, shown", [
    ([torch.zeros(3)], "got list"),
    ({"0.weight": [1.0, 2.0]}, "entry '0.weight' -> list"),
    ({"model": {"0.weight": torch.zeros(16, 6)}}, "entry 'model' -> dict"),
])
def test_not_a_state_dict_is_refused(tmp_path, content, shown):
    file = tmp_path / "weights" / "src.pt"
    file.parent.mkdir()
    torch.save(content, file)
    message = _refused(tmp_path, _policy(file_sha256(file), ALL_FROM_FILE))
    assert message.startswith("checkpoints.src: not a state dict") and shown in message


def test_safetensors_without_the_package_is_one_line(tmp_path):
    if importlib.util.find_spec("safetensors") is not None:
        pytest.skip("safetensors is installed")
    file = tmp_path / "weights" / "src.safetensors"
    file.parent.mkdir()
    file.write_bytes(b"not read")
    message = _refused(tmp_path, _policy(file_sha256(file), ALL_FROM_FILE, path="weights/src.safetensors"))
    assert "needs the optional safetensors package" in message


def test_safetensors_file_is_read_when_installed(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    net = _net(seed=2)
    file = tmp_path / "weights" / "src.safetensors"
    file.parent.mkdir()
    safetensors_torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(file))
    target = _net(seed=4)
    apply_policy(target, load_policy_from(tmp_path, _policy(file_sha256(file), ALL_FROM_FILE, path="weights/src.safetensors")))
    assert _same(_state(target), _state(net))


def load_policy_from(folder, data: dict) -> InitPolicy:
    path = folder / "policy.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return load_policy(path)
