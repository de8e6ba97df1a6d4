"""Tests of initsearch.proxy.data: digits, synthetic, and CIFAR-10 (tiny archives served over loopback HTTP)."""
from __future__ import annotations

import os
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from initsearch.errors import DataError
from initsearch.proxy.data import (
    CIFAR10_FOLDER,
    Dataset,
    digits_arrays,
    load_cifar10,
    load_dataset,
    read_cifar_batch,
    synthetic_dataset,
)

try:  # tests/ is a package in this checkout; fall back to a plain sys.path import when it is not
    from tests import cifar_fixture as cf
except ImportError:  # pragma: no cover
    import cifar_fixture as cf  # type: ignore[no-redef]

N_PER_BATCH = 20
DIGITS_TOTAL = 1797


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback requests must go straight to the test server, never to a configured proxy."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.dim()) if d != 1]
    return x.double().mean(dim=dims), x.double().std(dim=dims, correction=0)


def _listing(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()} if root.exists() else set()


# ----------------------------------------------------------------------------------------------- digits
def test_digits_shapes_dtypes_and_classes(digits: Dataset) -> None:
    assert digits.name == "digits" and digits.num_classes == 10
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.input_shape == (1, 8, 8)
    assert digits.x_val.shape[1:] == (1, 8, 8) and digits.x_val.dtype == torch.float32
    n_train, n_val = digits.x_train.shape[0], digits.x_val.shape[0]
    assert n_train + n_val == DIGITS_TOTAL
    assert abs(n_val - 0.2 * DIGITS_TOTAL) <= 5
    assert set(digits.y_train.tolist()) == set(range(10)) == set(digits.y_val.tolist())


def test_digits_split_is_stratified(digits: Dataset) -> None:
    train, val = Counter(digits.y_train.tolist()), Counter(digits.y_val.tolist())
    for cls in range(10):
        total = train[cls] + val[cls]
        assert val[cls] == round(0.2 * total), (cls, val[cls], total)


def test_digits_normalized_per_channel_on_train(digits: Dataset) -> None:
    mean, std = _channel_stats(digits.x_train)
    assert torch.allclose(mean, torch.zeros(1, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(std, torch.ones(1, dtype=torch.float64), atol=1e-5)
    val_mean, val_std = _channel_stats(digits.x_val)  # same statistics applied: close, not exact
    assert abs(val_mean.item()) < 0.1 and abs(val_std.item() - 1) < 0.1


def test_digits_unnormalized_is_scaled_to_unit_interval() -> None:
    ds = load_dataset("digits", normalize=False)
    assert ds.x_train.min().item() == 0.0 and ds.x_train.max().item() == 1.0
    values = torch.unique(ds.x_train * 16)  # pixel counts 0..16
    assert torch.equal(values, torch.arange(17, dtype=torch.float32))


def test_digits_read_without_sklearn_are_sklearns_digits() -> None:
    """The digits are read from the file scikit-learn ships, without importing it: the same arrays."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    images, labels = digits_arrays()
    bunch = sklearn_load_digits()
    assert images.dtype == np.float32 and labels.dtype == np.int64
    assert np.array_equal(images, bunch.images.astype(np.float32)) and np.array_equal(labels, bunch.target)


def test_subset_keeps_nested_seeded_prefix() -> None:
    full = load_dataset("digits", normalize=False)
    small = load_dataset("digits", subset=50, normalize=False)
    large = load_dataset("digits", subset=200, normalize=False)
    assert small.x_train.shape[0] == 50 and large.x_train.shape[0] == 200
    assert torch.equal(small.x_val, full.x_val)  # val untouched
    assert torch.equal(large.x_train[:50], small.x_train)  # nested: a prefix of the same permutation
    other = load_dataset("digits", subset=50, normalize=False, seed=1)
    assert not torch.equal(other.x_train, small.x_train)


def test_subset_normalization_uses_the_subset() -> None:
    ds = load_dataset("digits", subset=64)
    mean, std = _channel_stats(ds.x_train)
    assert abs(mean.item()) < 1e-5 and abs(std.item() - 1) < 1e-5


def test_seed_determinism() -> None:
    a, b = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4)
    for field in ("x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.y_val, c.y_val)


def test_device_is_kept_and_to_returns_a_copy(digits: Dataset) -> None:
    moved = digits.to("meta")
    assert all(t.device.type == "meta" for t in (moved.x_train, moved.y_train, moved.x_val, moved.y_val))
    assert digits.x_train.device.type == "cpu"  # the original is not moved
    assert moved.input_shape == (1, 8, 8) and moved.num_classes == 10
    on_meta = load_dataset("synthetic", device="meta", synthetic={"n_train": 8, "n_val": 4})
    assert on_meta.x_val.device.type == "meta" and on_meta.y_train.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device() -> None:
    ds = load_dataset("digits", device="cuda", subset=32)
    assert ds.x_train.is_cuda and ds.y_val.is_cuda and ds.x_train.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": "mnist"}, "data.name"),
        ({"name": "digits", "val_fraction": 1.5}, "data.val_fraction"),
        ({"name": "digits", "subset": 0}, "data.subset"),
        ({"name": "digits", "subset": 10_000}, "data.subset"),
        ({"name": "digits", "device": "nonsense"}, "data.device"),
        ({"name": "synthetic", "synthetic": {"n_trian": 5}}, "data.synthetic.n_trian"),
        ({"name": "synthetic", "synthetic": {"input_shape": [0]}}, "data.synthetic.input_shape"),
    ],
)
def test_bad_arguments_raise_one_line_data_error(kwargs: dict, needle: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(DataError) as info:
        load_dataset(name, **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


# -------------------------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_and_determinism() -> None:
    # a DictConfig with a ListConfig shape, as Hydra passes it
    options = OmegaConf.create({"n_train": 64, "n_val": 32, "input_shape": [3, 4, 4], "num_classes": 3})
    ds = load_dataset("synthetic", synthetic=options)
    assert ds.x_train.shape == (64, 3, 4, 4) and ds.x_val.shape == (32, 3, 4, 4)
    assert ds.num_classes == 3 and ds.y_train.dtype == torch.int64
    assert int(ds.y_train.max()) < 3 and int(ds.y_train.min()) >= 0
    again = load_dataset("synthetic", synthetic=options)
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_val, again.y_val)
    mean, std = _channel_stats(ds.x_train)  # per-channel normalization on (N, C, H, W)
    assert torch.allclose(mean, torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(std, torch.ones(3, dtype=torch.float64), atol=1e-5)


def test_synthetic_is_learnable_by_logistic_regression() -> None:
    ds = synthetic_dataset(n_train=512, n_val=256, input_shape=(20,), num_classes=4, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(20, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(ds.x_train), ds.y_train).backward()
        opt.step()
    with torch.no_grad():
        val_acc = (model(ds.x_val).argmax(1) == ds.y_val).float().mean().item()
    majority = max(Counter(ds.y_val.tolist()).values()) / ds.y_val.numel()
    assert val_acc > 0.8 and val_acc > majority + 0.3, (val_acc, majority)


# ----------------------------------------------------------------------------------------------- cifar10
def test_cifar_download_verify_extract_parse_then_offline(tmp_path: Path) -> None:
    served, root = tmp_path / "served", tmp_path / "root"
    served.mkdir()
    _, md5 = cf.make_cifar_archive(served, n_per_batch=N_PER_BATCH)
    with cf.serve_directory(served) as base:
        url = f"{base}/{cf.ARCHIVE}"
        x_train, y_train, x_test, y_test = load_cifar10(root, url=url, md5=md5)
    assert x_train.shape == (5 * N_PER_BATCH, 3, 32, 32) and x_train.dtype == torch.uint8
    assert x_test.shape == (N_PER_BATCH, 3, 32, 32) and y_test.dtype == torch.int64
    assert _listing(root) == {CIFAR10_FOLDER}  # extracted; temp archive and staging folder gone
    # the server is stopped: the second load reads root only
    ds = load_dataset("cifar10", root=str(root), url=url, md5=md5, subset=60)
    assert ds.x_train.shape == (60, 3, 32, 32) and ds.x_val.shape == (N_PER_BATCH, 3, 32, 32)
    assert ds.num_classes == 10 and ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    mean, std = _channel_stats(ds.x_train)
    assert torch.allclose(mean, torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(std, torch.ones(3, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("style", ["py3", "py2"])
def test_cifar_parses_pixels_and_labels_exactly(tmp_path: Path, style: str) -> None:
    batches = cf.write_cifar_folder(tmp_path, n_per_batch=4, style=style)
    x_train, y_train, x_test, y_test = load_cifar10(tmp_path, download=False)
    rows = np.concatenate([batches[f][b"data"] for f in cf.TRAIN_FILES])
    labels = sum((batches[f][b"labels"] for f in cf.TRAIN_FILES), [])
    assert np.array_equal(x_train.numpy(), rows.reshape(-1, 3, 32, 32))  # R, G, B planes, row-major
    assert y_train.tolist() == labels and y_test.tolist() == batches[cf.TEST_FILE][b"labels"]
    assert np.array_equal(x_test.numpy().reshape(4, -1), batches[cf.TEST_FILE][b"data"])


def test_cifar_unnormalized_is_pixels_over_255(tmp_path: Path) -> None:
    batches = cf.write_cifar_folder(tmp_path, n_per_batch=4)
    ds = load_dataset("cifar10", root=str(tmp_path), download=False, normalize=False)
    expected = torch.from_numpy(batches[cf.TEST_FILE][b"data"].reshape(4, 3, 32, 32)).float() / 255
    assert torch.equal(ds.x_val, expected)


def test_cifar_wrong_md5_refused_file_deleted_nothing_extracted(tmp_path: Path) -> None:
    served, root = tmp_path / "served", tmp_path / "root"
    served.mkdir()
    _, md5 = cf.make_cifar_archive(served, n_per_batch=2)
    wrong = "0" * 32
    with cf.serve_directory(served) as base, pytest.raises(DataError) as info:
        load_cifar10(root, url=f"{base}/{cf.ARCHIVE}", md5=wrong)
    message = str(info.value)
    assert wrong in message and md5 in message and "\n" not in message
    assert _listing(root) == set()


def test_cifar_truncated_download_refused(tmp_path: Path) -> None:
    served, root = tmp_path / "served", tmp_path / "root"
    served.mkdir()
    path, md5 = cf.make_cifar_archive(served, n_per_batch=2)
    with cf.serve_directory(served, truncate_to=path.stat().st_size // 2) as base, pytest.raises(DataError) as info:
        load_cifar10(root, url=f"{base}/{cf.ARCHIVE}", md5=md5)
    assert "truncated" in str(info.value)
    assert _listing(root) == set()


def test_cifar_unreadable_tar_with_matching_md5_refused(tmp_path: Path) -> None:
    served, root = tmp_path / "served", tmp_path / "root"
    served.mkdir()
    path, _ = cf.make_cifar_archive(served, n_per_batch=2)
    cut = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(cut)  # a consistent file (Content-Length matches) that is not a whole tar
    with cf.serve_directory(served) as base, pytest.raises(DataError) as info:
        load_cifar10(root, url=f"{base}/{cf.ARCHIVE}", md5=cf.file_md5(path))
    assert "cannot read archive" in str(info.value)
    assert _listing(root) == set()


def _unsafe_member(kind: str, tmp_path: Path) -> tuple[tarfile.TarInfo, bytes | None]:
    if kind == "dotdot":
        return tarfile.TarInfo("../evil"), b"evil"
    if kind == "nested_dotdot":
        return tarfile.TarInfo(f"{CIFAR10_FOLDER}/../../evil"), b"evil"
    if kind == "absolute":
        return tarfile.TarInfo(str(tmp_path / "evil")), b"evil"
    info = tarfile.TarInfo(f"{CIFAR10_FOLDER}/batches.meta")
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, str(tmp_path / "evil")
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, f"{CIFAR10_FOLDER}/test_batch"
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    elif kind == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info, None


@pytest.mark.parametrize("kind", ["dotdot", "nested_dotdot", "absolute", "symlink", "hardlink", "fifo", "device"])
def test_cifar_unsafe_archive_member_refused_nothing_extracted(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    info, content = _unsafe_member(kind, tmp_path)
    archive = root / cf.ARCHIVE  # an archive the user placed in root (same checks as a downloaded one)
    md5 = cf.write_tar(archive, [*cf.valid_members(), (info, content)])  # the unsafe member comes last
    with pytest.raises(DataError) as info_err:
        load_cifar10(root, md5=md5, download=False)
    message = str(info_err.value)
    assert f"unsafe archive member {info.name!r}" in message and "\n" not in message
    assert _listing(root) == {cf.ARCHIVE}  # a user's archive is kept; nothing extracted
    assert not (tmp_path / "evil").exists()


def test_cifar_unsafe_download_refused_and_removed(tmp_path: Path) -> None:
    served, root = tmp_path / "served", tmp_path / "root"
    served.mkdir()
    md5 = cf.write_tar(served / cf.ARCHIVE, [*cf.valid_members(), (tarfile.TarInfo("../evil"), b"evil")])
    with cf.serve_directory(served) as base, pytest.raises(DataError, match=r"'\.\./evil'"):
        load_cifar10(root, url=f"{base}/{cf.ARCHIVE}", md5=md5)
    assert _listing(root) == set() and not (tmp_path / "evil").exists()


def test_cifar_placed_archive_used_without_network(tmp_path: Path) -> None:
    _, md5 = cf.make_cifar_archive(tmp_path, n_per_batch=3)
    x_train, _, x_test, _ = load_cifar10(tmp_path, url=cf.closed_port_url(), md5=md5, download=False)
    assert x_train.shape[0] == 15 and x_test.shape[0] == 3
    assert (tmp_path / CIFAR10_FOLDER / "test_batch").is_file()


class _Shell:
    """Unpickling this runs a shell command (the classic pickle exploit)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class _Exec:
    """Unpickling this runs Python source through builtins.exec."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple:
        return (exec, (self.source,))


class NotABatch:
    """A plain class instance: unpickling it needs this module's global."""

    def __init__(self) -> None:
        self.data = np.zeros((1, 3072), dtype=np.uint8)


def test_malicious_payload_is_live_with_plain_pickle(tmp_path: Path) -> None:
    """The payload used below really executes under pickle.loads, so its refusal test can fail."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps({b"data": _Shell(f"touch {marker}")}, protocol=2))
    assert marker.exists()


def _bad_batches(marker: Path) -> dict[str, bytes]:
    good = cf.make_batch(3, 0, "x")
    return {
        "os_system": pickle.dumps({b"data": _Shell(f"touch {marker}"), b"labels": [0]}, protocol=2),
        "exec": pickle.dumps(_Exec(f"open({str(marker)!r}, 'w').close()"), protocol=2),
        "class_instance": pickle.dumps(NotABatch(), protocol=2),
        "not_a_dict": pickle.dumps([good[b"data"], good[b"labels"]], protocol=2),
        "float_data": pickle.dumps({**good, b"data": good[b"data"].astype(np.float64)}, protocol=2),
        "wrong_shape": pickle.dumps({**good, b"data": np.zeros((3, 100), dtype=np.uint8)}, protocol=2),
        "label_out_of_range": pickle.dumps({**good, b"labels": [0, 1, 10]}, protocol=2),
        "too_few_labels": pickle.dumps({**good, b"labels": [0, 1]}, protocol=2),
        "not_a_pickle": b"this is not a pickle",
    }


@pytest.mark.parametrize("case", list(_bad_batches(Path("m"))))
def test_bad_batch_file_refused_without_executing(tmp_path: Path, case: str) -> None:
    marker = tmp_path / "pwned"
    root = tmp_path / "root"
    cf.write_cifar_folder(root, n_per_batch=3, overrides={"test_batch": _bad_batches(marker)[case]})
    with pytest.raises(DataError) as info:
        load_cifar10(root, download=False)
    message = str(info.value)
    assert str(root / CIFAR10_FOLDER / "test_batch") in message and "\n" not in message
    assert not marker.exists()


def test_read_cifar_batch_accepts_official_py2_layout(tmp_path: Path) -> None:
    batch = cf.make_batch(2, 1, "b")
    path = tmp_path / "b"
    path.write_bytes(cf.pickle_bytes(batch, "py2"))
    assert b"numpy.core.multiarray" in path.read_bytes()
    data, labels = read_cifar_batch(path)
    assert np.array_equal(data, batch[b"data"]) and labels.tolist() == batch[b"labels"]


def test_missing_data_offline_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path, download=False)
    message = str(info.value)
    assert f"{tmp_path / CIFAR10_FOLDER}/" in message and "data.root=" in message and cf.ARCHIVE in message
    assert "\n" not in message


def test_unreachable_url_names_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", root=str(root), url=cf.closed_port_url())
    message = str(info.value)
    assert f"{root / CIFAR10_FOLDER}/" in message and "data.root=" in message and "\n" not in message
    assert not any(p.name.startswith(".cifar") for p in root.iterdir())


def test_incomplete_folder_refused_not_overwritten(tmp_path: Path) -> None:
    cf.write_cifar_folder(tmp_path, n_per_batch=2)
    (tmp_path / CIFAR10_FOLDER / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(tmp_path, url=cf.closed_port_url())
    assert (tmp_path / CIFAR10_FOLDER / "data_batch_1").is_file()


def test_empty_dataset_folder_is_filled_by_download(tmp_path: Path) -> None:
    served, root = tmp_path / "served", tmp_path / "root"
    served.mkdir()
    (root / CIFAR10_FOLDER).mkdir(parents=True)  # e.g. made by a user about to copy files in
    _, md5 = cf.make_cifar_archive(served, n_per_batch=2)
    with cf.serve_directory(served) as base:
        x_train, *_ = load_cifar10(root, url=f"{base}/{cf.ARCHIVE}", md5=md5)
    assert x_train.shape[0] == 10 and _listing(root) == {CIFAR10_FOLDER}


def test_cifar_archive_filling_the_disk_while_extracting_is_one_line_and_leaves_nothing(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    """The disk fills up half-way through extraction (ENOSPC from the file system, injected): one line
    naming data.root and what to do; the staging folder and the downloaded archive are gone."""
    import errno

    served, root = tmp_path / "served", tmp_path / "root"
    served.mkdir()
    _, md5 = cf.make_cifar_archive(served, n_per_batch=N_PER_BATCH)
    real_extractall = tarfile.TarFile.extractall

    def fill_the_disk(self, path, members=None, **kwargs):
        real_extractall(self, path, members=list(members or self.getmembers())[:2], **kwargs)  # a partial write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", fill_the_disk)
    with cf.serve_directory(served) as base, pytest.raises(DataError) as info:
        load_cifar10(root, url=f"{base}/{cf.ARCHIVE}", md5=md5)
    message = str(info.value)
    assert message.startswith(f"data.root: the disk under {root}/ is full while extracting ") and "\n" not in message
    assert "make room or set data.root=" in message
    assert _listing(root) == set()  # no partial dataset folder, no staging folder, no archive left behind
