"""Datasets as tensors on the device, for a study's short training runs.

Three datasets, all returned as a :class:`Dataset` of float32 inputs and int64 labels:

* ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, ships with scikit-learn, no network),
  split into train/val by a seeded stratified split.
* ``cifar10``: the official python archive (``cifar-10-python.tar.gz``), read from ``root`` or downloaded
  once, md5-checked, extracted safely and parsed by a restricted unpickler; train = data_batch_1..5,
  val = test_batch.
* ``synthetic``: Gaussian inputs labelled by a fixed random linear teacher, so a net can beat chance.

:func:`load_dataset` is the one entry point the study uses: it builds the split, keeps a seeded ``subset``
of the training examples, normalizes per channel with statistics of the (subsetted) training split, and
moves everything to ``device``. Every problem is a :class:`~initsearch.errors.DataError` with one line.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import http.client
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import torch

from initsearch.errors import DataError

DATASET_NAMES: tuple[str, ...] = ("cifar10", "digits", "synthetic")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_NUM_CLASSES = 10
CIFAR10_ROW_BYTES = 3 * 32 * 32
DEFAULT_ROOT = "data"
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20
_STD_FLOOR = 1e-8

# Seed "streams": one seed drives several independent draws, each tagged so they never share a stream.
_STREAM_SPLIT, _STREAM_SUBSET, _STREAM_INPUTS, _STREAM_TEACHER = 1, 2, 3, 4


# --------------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """A train/val split kept as tensors on one device.

    ``x_*`` are float32, ``(N, C, H, W)`` for images or ``(N, D)`` for synthetic vectors; ``y_*`` are int64
    class indices in ``[0, num_classes)``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        """Refuse splits whose inputs and labels disagree in length."""
        for split, x, y in (("train", self.x_train, self.y_train), ("val", self.x_val, self.y_val)):
            if x.shape[0] != y.shape[0]:
                raise DataError(f"{self.name}: x_{split} has {x.shape[0]} examples but y_{split} has {y.shape[0]}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. ``(3, 32, 32)`` or ``(20,)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def device(self) -> torch.device:
        """The device the tensors live on."""
        return self.x_train.device

    def to(self, device: str | torch.device) -> Dataset:
        """A copy with every tensor on ``device`` (the same object's tensors are not moved in place)."""
        dev = _parse_device(device)
        try:
            moved = {f: getattr(self, f).to(dev) for f in ("x_train", "y_train", "x_val", "y_val")}
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise DataError(f"data.device: cannot move {self.name} to {device!r}: {_one_line(exc)}") from None
        return dataclasses.replace(self, **moved)


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------
def load_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    url: str | None = None,
    md5: str | None = None,
    download: bool = True,
    val_fraction: float = 0.2,
    subset: int | None = None,
    normalize: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    synthetic: Mapping[str, Any] | None = None,
) -> Dataset:
    """Load ``name`` ("digits", "cifar10" or "synthetic") as float32 tensors on ``device``.

    Steps, in order: build the train/val split (digits: stratified by ``val_fraction``; cifar10: the
    official train/test files; synthetic: ``n_train``/``n_val`` from the ``synthetic`` mapping, so
    ``val_fraction`` does not apply), keep the first ``subset`` examples of a seeded permutation of the
    train split (nested: a smaller subset is a prefix of a larger one for the same seed), scale images to
    [0, 1], then, if ``normalize``, subtract the per-channel mean and divide by the per-channel std of the
    kept train examples (channel = dim 1: the one digits channel, the RGB channels, synthetic features),
    applying the same statistics to val. ``root``/``url``/``md5``/``download`` are used by cifar10 only
    (defaults: ``./data``, the official URL and md5).
    """
    if name not in DATASET_NAMES:
        raise DataError(f"data.name: unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    dev = _parse_device(device)
    seed = _check_seed(seed)
    if name == "digits":
        ds = load_digits(val_fraction=val_fraction, seed=seed)
        ds = subset_dataset(ds, subset, seed=seed)
    elif name == "synthetic":
        ds = synthetic_dataset(**_synthetic_kwargs(synthetic, seed))
        ds = subset_dataset(ds, subset, seed=seed)
    else:
        ds = _cifar10_dataset(root, url=url, md5=md5, download=download, subset=subset, seed=seed)
    if normalize:
        ds = normalize_dataset(ds)
    return ds.to(dev)


# --------------------------------------------------------------------------------------------------
# Splits, subsets, normalization
# --------------------------------------------------------------------------------------------------
def _rng(seed: int, stream: int) -> np.random.Generator:
    """A numpy generator for one purpose (``stream``) of one seed; identical on every platform."""
    return np.random.default_rng([seed, stream])


def _check_seed(seed: Any) -> int:
    """``seed`` as a non-negative int, or DataError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"data.seed: must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_val_fraction(val_fraction: Any) -> float:
    """``val_fraction`` as a float strictly between 0 and 1, or DataError."""
    try:
        value = float(val_fraction)
    except (TypeError, ValueError):
        raise DataError(f"data.val_fraction: must be a number in (0, 1), got {val_fraction!r}") from None
    if not 0.0 < value < 1.0:
        raise DataError(f"data.val_fraction: must be in (0, 1), got {val_fraction!r}")
    return value


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with ``round(val_fraction * n_c)`` of each class ``c`` in val, each shuffled.

    Per-class rounding keeps the class proportions of both splits equal to the whole's (within one
    example per class). A class too small to give both splits an example is refused.
    """
    fraction = _check_val_fraction(val_fraction)
    rng = _rng(seed, _STREAM_SPLIT)
    train_parts, val_parts = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(fraction * idx.size))
        if n_val == 0 or n_val == idx.size:
            raise DataError(
                f"data.val_fraction: {fraction} leaves class {int(cls)} ({idx.size} examples) with an empty split"
            )
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    return rng.permutation(np.concatenate(train_parts)), rng.permutation(np.concatenate(val_parts))


def subset_indices(n_train: int, subset: int | None, seed: int) -> np.ndarray | None:
    """The first ``subset`` entries of a seeded permutation of ``range(n_train)``; None keeps all.

    A subset larger than the train split is refused rather than silently clipped, so a config asking for
    more data than exists is noticed.
    """
    if subset is None:
        return None
    if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < 1:
        raise DataError(f"data.subset: must be a positive integer or null, got {subset!r}")
    if subset > n_train:
        raise DataError(f"data.subset: {subset} exceeds the {n_train} training examples")
    return _rng(seed, _STREAM_SUBSET).permutation(n_train)[: int(subset)]


def subset_dataset(ds: Dataset, subset: int | None, *, seed: int = 0) -> Dataset:
    """``ds`` with only the :func:`subset_indices` of its train split (val untouched)."""
    idx = subset_indices(ds.x_train.shape[0], subset, seed)
    if idx is None:
        return ds
    index = torch.from_numpy(idx).to(ds.x_train.device)
    return dataclasses.replace(ds, x_train=ds.x_train[index], y_train=ds.y_train[index])


def keep_classes(ds: Dataset, classes: Any) -> Dataset:
    """``ds`` with only the examples of ``classes`` (a list of distinct label indices), relabelled
    0..len(classes)-1 in the given order: e.g. digits 5-9 as a five-class task (``data.classes``)."""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (list, tuple)) or len(classes) < 2 \
            or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < ds.num_classes for c in classes) \
            or len(set(classes)) != len(classes):
        raise DataError(f"data.classes: must be a list of at least two distinct labels in [0, {ds.num_classes}), "
                        f"got {classes!r}")
    relabel = torch.full((ds.num_classes,), -1, dtype=torch.long, device=ds.y_train.device)
    relabel[torch.tensor(list(classes), device=relabel.device)] = torch.arange(len(classes), device=relabel.device)
    splits = {}
    for split in ("train", "val"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        keep = relabel[y] >= 0
        splits[f"x_{split}"], splits[f"y_{split}"] = x[keep], relabel[y[keep]]
    return dataclasses.replace(ds, num_classes=len(classes), **splits)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of ``x`` over every dim but dim 1, shaped to broadcast.

    Computed in float64 so 50 000 CIFAR images sum without float32 round-off; the std is floored at
    1e-8 so a constant channel maps to 0 instead of NaN.
    """
    dims = [d for d in range(x.dim()) if d != 1]
    x64 = x.double()
    mean = x64.mean(dim=dims, keepdim=True)
    std = x64.std(dim=dims, keepdim=True, correction=0).clamp_min(_STD_FLOOR)
    return mean.float(), std.float()


def normalize_dataset(ds: Dataset) -> Dataset:
    """``ds`` with both splits standardized by the per-channel statistics of its train split."""
    if ds.x_train.dim() < 2 or ds.x_train.shape[0] == 0:
        raise DataError(f"{ds.name}: cannot normalize inputs of shape {tuple(ds.x_train.shape)}")
    mean, std = channel_stats(ds.x_train)
    return dataclasses.replace(ds, x_train=(ds.x_train - mean) / std, x_val=(ds.x_val - mean) / std)


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------
DIGITS_MAX_VALUE = 16.0


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as ``(N, 8, 8)`` float32 pixel counts and ``(N,)`` int64 labels.

    Read from the CSV file scikit-learn ships (what ``sklearn.datasets.load_digits`` reads), found without
    importing scikit-learn: that import takes about a second, most of a short study's start. Through
    ``load_digits`` itself when the file is not where this version keeps it.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DataError("digits needs scikit-learn (pip install scikit-learn); it ships the images")
    for folder in spec.submodule_search_locations or []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            import gzip

            with gzip.open(path, "rt") as handle:
                table = np.loadtxt(handle, delimiter=",", dtype=np.float64)
            return table[:, :-1].reshape(-1, 8, 8).astype(np.float32), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    return np.asarray(bunch.images, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64)


def load_digits(*, val_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` float32 in [0, 1] (pixel counts 0..16 divided by 16).

    Split by :func:`stratified_split`; on CPU, not normalized (``load_dataset`` does that).
    """
    images, labels = digits_arrays()
    images = images / DIGITS_MAX_VALUE
    train, val = stratified_split(labels, val_fraction, seed)
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    index_train, index_val = torch.from_numpy(train), torch.from_numpy(val)
    return Dataset("digits", x[index_train], y[index_train], x[index_val], y[index_val], int(labels.max()) + 1)


# --------------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------------
_SYNTHETIC_KEYS: tuple[str, ...] = ("n_train", "n_val", "input_shape", "num_classes", "seed")


def synthetic_dataset(
    n_train: int = 512,
    n_val: int = 256,
    input_shape: tuple[int, ...] = (20,),
    num_classes: int = 4,
    seed: int = 0,
) -> Dataset:
    """Inputs ``x ~ N(0, I)`` of shape ``(N, *input_shape)``, labels ``argmax(W^T flatten(x))``.

    ``W`` is a random Gaussian ``(D, num_classes)`` teacher fixed by ``seed`` with unit-norm columns (so no
    class dominates by a larger column norm). The labels are a deterministic linear function of the
    inputs: a linear classifier can reach near-perfect accuracy, far above the 1/num_classes of chance.
    Train and val are drawn from the same stream (train first), on CPU, float32.
    """
    shape = _check_shape(input_shape)
    n_train, n_val = _check_positive("n_train", n_train), _check_positive("n_val", n_val)
    num_classes = _check_positive("num_classes", num_classes, minimum=2)
    seed = _check_seed(seed)
    dim = int(np.prod(shape))
    inputs = _rng(seed, _STREAM_INPUTS).standard_normal((n_train + n_val, dim))
    teacher = _rng(seed, _STREAM_TEACHER).standard_normal((dim, num_classes))
    teacher /= np.linalg.norm(teacher, axis=0, keepdims=True)
    labels = np.argmax(inputs @ teacher, axis=1).astype(np.int64)
    x = torch.from_numpy(inputs.astype(np.float32)).reshape(n_train + n_val, *shape)
    y = torch.from_numpy(labels)
    return Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes)


def _check_positive(key: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or DataError naming ``data.synthetic.<key>``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"data.synthetic.{key}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_shape(input_shape: Any) -> tuple[int, ...]:
    """``input_shape`` (a tuple/list, e.g. a Hydra ListConfig) as a non-empty tuple of positive ints."""
    if isinstance(input_shape, (int, np.integer)) and not isinstance(input_shape, bool):
        input_shape = (input_shape,)
    try:
        dims = tuple(input_shape)
    except TypeError:
        raise DataError(f"data.synthetic.input_shape: must be a list of integers, got {input_shape!r}") from None
    ok = bool(dims) and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in dims)
    if not ok:
        raise DataError(f"data.synthetic.input_shape: must be a list of positive integers, got {list(dims)!r}")
    return tuple(int(d) for d in dims)


def _synthetic_kwargs(options: Mapping[str, Any] | None, seed: int) -> dict[str, Any]:
    """The ``synthetic`` mapping as keyword arguments; unknown keys refused, ``seed`` defaults to data.seed."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_SYNTHETIC_KEYS))
    if unknown:
        raise DataError(f"data.synthetic.{unknown[0]}: unknown key; expected some of {', '.join(_SYNTHETIC_KEYS)}")
    options.setdefault("seed", seed)
    return options


# --------------------------------------------------------------------------------------------------
# CIFAR-10: the dataset
# --------------------------------------------------------------------------------------------------
def _cifar10_dataset(
    root: str | os.PathLike[str] | None,
    *,
    url: str | None,
    md5: str | None,
    download: bool,
    subset: int | None,
    seed: int,
) -> Dataset:
    """CIFAR-10 as a float32 Dataset in [0, 1]; the subset is taken on the uint8 images before conversion."""
    x_train, y_train, x_val, y_val = load_cifar10(
        DEFAULT_ROOT if root is None else root,
        url=CIFAR10_URL if url is None else url,
        md5=CIFAR10_MD5 if md5 is None else md5,
        download=download,
    )
    idx = subset_indices(x_train.shape[0], subset, seed)
    if idx is not None:
        index = torch.from_numpy(idx)
        x_train, y_train = x_train[index], y_train[index]
    return Dataset("cifar10", _to_unit(x_train), y_train, _to_unit(x_val), y_val, CIFAR10_NUM_CLASSES)


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as float32 in [0, 1]."""
    return images.float().div_(255.0)


def load_cifar10(
    root: str | os.PathLike[str],
    *,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
    download: bool = True,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CIFAR-10 as ``(x_train uint8 (50000, 3, 32, 32), y_train int64, x_test uint8, y_test int64)``.

    Looks for ``root/cifar-10-batches-py/``; if absent, uses an archive already placed at
    ``root/<archive name>`` (md5-checked, kept), else downloads ``url`` (md5-checked, extracted, then
    deleted). Extraction goes to a private folder inside ``root`` that is renamed into place only once
    complete, so concurrent or interrupted loads never leave a half-written dataset folder.
    """
    root_path = Path(root).expanduser().absolute()
    folder = root_path / CIFAR10_FOLDER
    if not _cifar_folder_complete(folder):
        _check_not_partial(folder)
        archive = root_path / _archive_name(url)
        if archive.is_file():
            _verify_md5(archive, md5, _file_md5(archive), delete=False)
            _safe_extract(archive, root_path)
        elif download:
            _download_and_extract(url, md5, root_path, timeout)
        else:
            raise DataError(_missing_message(root_path, url, "download=False"))
    return _read_cifar_folder(folder)


def _archive_name(url: str) -> str:
    """The archive's file name: the last path segment of ``url`` (``cifar-10-python.tar.gz`` officially)."""
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    return name or "cifar-10-python.tar.gz"


def _cifar_files() -> tuple[str, ...]:
    """The batch files a complete dataset folder holds (batches.meta is optional)."""
    return (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)


def _cifar_folder_complete(folder: Path) -> bool:
    """Whether ``folder`` holds every batch file."""
    return all((folder / f).is_file() for f in _cifar_files())


def _check_not_partial(folder: Path) -> None:
    """Refuse a non-empty dataset folder that lacks some batch files (user files are never overwritten).

    An empty folder is fine: renaming the extracted folder onto it replaces it.
    """
    if folder.is_dir() and any(folder.iterdir()):
        missing = [f for f in _cifar_files() if not (folder / f).is_file()]
        raise DataError(
            f"CIFAR-10 folder {folder}/ is incomplete (missing {', '.join(missing)}); "
            "add the files or delete the folder to download again"
        )


def _missing_message(root: Path, url: str, reason: str) -> str:
    """The one-line 'where to put the files' message for an absent dataset."""
    return (
        f"CIFAR-10 not found and not downloaded ({reason}): put data_batch_1..5 and test_batch in "
        f"{root / CIFAR10_FOLDER}/ (or the archive {_archive_name(url)} from {url} in {root}/); "
        "set data.root=... to use another folder"
    )


# --------------------------------------------------------------------------------------------------
# CIFAR-10: download, checksum, extraction
# --------------------------------------------------------------------------------------------------
def _one_line(exc: BaseException | str) -> str:
    """An exception (or text) as one line, for embedding in a DataError message."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _disk_full(exc: OSError) -> bool:
    """Whether an OSError says the disk (or the user's quota) is full."""
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _disk_full_message(root: Path, doing: str, what: str) -> str:
    """The one line for a disk that filled up while downloading or extracting CIFAR-10."""
    return (f"data.root: the disk under {root}/ is full while {doing} {what}; the partial files are removed "
            f"(CIFAR-10 needs about 340 MB there); make room or set data.root=... to another disk")


def _download_and_extract(url: str, md5: str, root: Path, timeout: float) -> None:
    """Download ``url`` into a temp file inside ``root``, verify, extract; the temp file never survives."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".cifar-download-", suffix=".part", dir=root)
    except OSError as exc:
        raise DataError(f"data.root: cannot write in {root}/: {_one_line(exc)}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            got_md5 = _download_to(url, out, timeout, root)
        _verify_md5(tmp, md5, got_md5, delete=True)
        _safe_extract(tmp, root, archive_label=url)
    finally:
        tmp.unlink(missing_ok=True)


def _download_to(url: str, out: BinaryIO, timeout: float, root: Path) -> str:
    """Stream ``url`` into ``out`` in 1 MiB chunks; return the md5 hex digest of what was written.

    A response shorter than its Content-Length is refused (http.client returns a short read, not an
    error, when the server closes early). Network failures become the 'where to put the files' message.
    """
    digest = hashlib.md5(usedforsecurity=False)
    received, expected, cut_short = 0, None, False
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "initsearch"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            expected = _content_length(response)
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
    except http.client.IncompleteRead:  # e.g. a chunked response cut short
        cut_short = True
    except OSError as exc:
        if _disk_full(exc):
            raise DataError(_disk_full_message(root, "downloading", url)) from None
        raise DataError(_missing_message(root, url, f"download failed: {_one_line(exc)}")) from None
    except (http.client.HTTPException, ValueError) as exc:
        raise DataError(_missing_message(root, url, f"download failed: {_one_line(exc)}")) from None
    if cut_short or (expected is not None and received < expected):
        of = f" of {expected}" if expected is not None else ""
        raise DataError(f"download of {url} truncated: got {received}{of} bytes; partial file removed")
    return digest.hexdigest()


def _content_length(response: Any) -> int | None:
    """The response's Content-Length header as an int, or None when absent or malformed."""
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _file_md5(path: Path) -> str:
    """md5 hex digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_md5(path: Path, expected: str, got: str, *, delete: bool) -> None:
    """Refuse an archive whose md5 differs from ``expected``; a downloaded one is deleted first."""
    if got.lower() == str(expected).strip().lower():
        return
    if delete:
        path.unlink(missing_ok=True)
        raise DataError(f"md5 mismatch for downloaded archive: expected {expected}, got {got}; file deleted")
    raise DataError(f"md5 mismatch for {path}: expected {expected}, got {got}; replace or delete the file")


def _member_kind(member: tarfile.TarInfo) -> str:
    """A word for a tar member's type, for error messages."""
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    return "special file"


def check_member(member: tarfile.TarInfo, dest: Path) -> None:
    """Refuse a tar member that is not a plain file/directory or would land outside ``dest``.

    Three independent checks: the type (no links, devices, fifos), the name (not absolute, no ``..``
    component), and the resolved target path (inside ``dest`` even after following existing symlinks).
    """
    name = member.name
    if not (member.isfile() or member.isdir()):
        raise DataError(f"unsafe archive member {name!r}: {_member_kind(member)} not allowed; nothing extracted")
    posix = PurePosixPath(name)
    if posix.is_absolute() or name.startswith("\\") or (len(name) > 1 and name[0].isalpha() and name[1] == ":"):
        raise DataError(f"unsafe archive member {name!r}: absolute path; nothing extracted")
    if ".." in posix.parts or ".." in name.split("\\"):
        raise DataError(f"unsafe archive member {name!r}: '..' in path; nothing extracted")
    base = dest.resolve()
    if not (base / name).resolve().is_relative_to(base):
        raise DataError(f"unsafe archive member {name!r}: resolves outside {base}; nothing extracted")


def _safe_extract(archive: Path, root: Path, archive_label: str | None = None) -> None:
    """Validate every member of ``archive``, then extract into a private folder and rename it into place.

    All members are checked before any is written; extraction also passes ``filter="data"`` where the
    Python has it (3.11.4+), a second line of defence. A tar that cannot be read is refused.
    """
    label = archive_label or str(archive)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".cifar-extract-", dir=root))
    except OSError as exc:
        raise DataError(f"data.root: cannot write in {root}/: {_one_line(exc)}") from None
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    check_member(member, staging)
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(staging, members=members, **extra)
        except OSError as exc:
            if _disk_full(exc):
                raise DataError(_disk_full_message(root, "extracting", label)) from None
            raise DataError(f"cannot read archive {label} (truncated or corrupt?): {_one_line(exc)}") from None
        except (tarfile.TarError, EOFError) as exc:
            raise DataError(f"cannot read archive {label} (truncated or corrupt?): {_one_line(exc)}") from None
        _install_folder(staging / CIFAR10_FOLDER, root / CIFAR10_FOLDER, label)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install_folder(extracted: Path, target: Path, label: str) -> None:
    """Rename the extracted dataset folder to ``target`` (a concurrent loader may have won the race)."""
    if not _cifar_folder_complete(extracted):
        raise DataError(f"archive {label} does not hold {CIFAR10_FOLDER}/ with data_batch_1..5 and test_batch")
    try:
        os.rename(extracted, target)
    except OSError:
        if not _cifar_folder_complete(target):
            raise DataError(f"cannot move the extracted data to {target}/") from None


# --------------------------------------------------------------------------------------------------
# CIFAR-10: parsing the batch files without executing anything
# --------------------------------------------------------------------------------------------------
class _NdarrayToken:
    """Stands in for ``numpy.ndarray`` inside a pickle: only accepted as ``_reconstruct``'s subtype.

    Handing the pickle the real class would let it call ``ndarray(shape)`` with any shape.
    """


_NDARRAY_TOKEN = _NdarrayToken()


def _safe_reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """Stand-in for ``numpy.core.multiarray._reconstruct``: an empty plain ndarray, nothing else.

    numpy pickles an array as ``_reconstruct(ndarray, (0,), b"b")`` followed by ``__setstate__`` with the
    real shape, dtype and bytes; those are the only arguments accepted.
    """
    if subtype is not _NDARRAY_TOKEN or tuple(shape) != (0,) or typecode not in (b"b", "b"):
        raise DataError("refused ndarray reconstruction with unexpected arguments")
    return np.ndarray((0,), dtype=np.int8)


def _safe_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """Stand-in for ``numpy.dtype`` inside a pickle: only the uint8 dtype (``u1``, str or bytes)."""
    if spec not in ("u1", b"u1"):
        raise DataError(f"refused dtype {spec!r}; only uint8 image data is accepted")
    return np.dtype(np.uint8)


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: how Python 3 spells ``bytes`` in protocol <= 2 pickles.

    Only ``(str, "latin1")`` is accepted, so no other codec can be looked up or run.
    """
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError("refused _codecs.encode call other than str -> latin1 bytes")
    return text.encode("latin-1")


# (module, name) -> the object handed to the pickle. Every other global is refused.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy", "ndarray"): _NDARRAY_TOKEN,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global but the few a plain uint8 ndarray needs (as safe stand-ins)."""

    def find_class(self, module: str, name: str) -> Any:
        """Return the stand-in for an allowed (module, name); raise DataError for anything else."""
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise DataError(f"refused global {module}.{name}")
        return allowed


def restricted_load(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`, byte strings kept as bytes."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _dict_get(obj: dict[Any, Any], key: str) -> Any:
    """``obj[b"key"]`` or ``obj["key"]`` (a batch re-pickled by Python 3 has str keys), or None."""
    return obj.get(key.encode(), obj.get(key))


def read_cifar_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as ``(data uint8 (n, 3072), labels int64 (n,))``, verified, or DataError naming it.

    The file is a pickled dict; ``data`` must be a uint8 ndarray of shape ``(n, 3072)`` (rows are the
    R, G, B planes of a 32x32 image, row-major) and ``labels`` a list of ``n`` ints in 0..9.
    """
    path = Path(path)
    try:
        obj = restricted_load(path.read_bytes())
    except DataError as exc:
        raise DataError(f"refused CIFAR batch file {path}: {exc}") from None
    except Exception as exc:  # any failure of an untrusted file is a data problem, not a bug
        raise DataError(f"cannot parse CIFAR batch file {path}: {_one_line(exc)}") from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR batch file {path} holds a {type(obj).__name__}, not a dict")
    data, labels = _dict_get(obj, "data"), _dict_get(obj, "labels")
    if type(data) is not np.ndarray or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR10_ROW_BYTES:
        desc = f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}".strip()
        raise DataError(f"CIFAR batch file {path}: 'data' must be a uint8 array (n, 3072), got {desc}")
    if type(labels) is not list or len(labels) != data.shape[0]:
        got = f"{type(labels).__name__} of length {len(labels) if hasattr(labels, '__len__') else '?'}"
        raise DataError(f"CIFAR batch file {path}: 'labels' must be a list of {data.shape[0]} ints, got {got}")
    if not all(type(v) is int and 0 <= v < CIFAR10_NUM_CLASSES for v in labels):
        raise DataError(f"CIFAR batch file {path}: 'labels' must be ints in 0..{CIFAR10_NUM_CLASSES - 1}")
    return np.ascontiguousarray(data), np.asarray(labels, dtype=np.int64)


def _read_cifar_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read the five train batches and the test batch of ``folder`` into image/label tensors."""
    train = [read_cifar_batch(folder / f) for f in CIFAR10_TRAIN_FILES]
    x_test, y_test = read_cifar_batch(folder / CIFAR10_TEST_FILE)
    x_train = np.concatenate([d for d, _ in train])
    y_train = np.concatenate([lab for _, lab in train])
    return _as_images(x_train), torch.from_numpy(y_train), _as_images(x_test), torch.from_numpy(y_test)


def _as_images(rows: np.ndarray) -> torch.Tensor:
    """``(n, 3072)`` uint8 rows as an ``(n, 3, 32, 32)`` uint8 tensor."""
    return torch.from_numpy(rows.reshape(-1, 3, 32, 32))


# --------------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------------
def _parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, or DataError naming ``data.device``."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise DataError(f"data.device: invalid device {device!r}: {_one_line(exc)}") from None
