"""Tiny CIFAR-10 archives in the official format, and a loopback HTTP server to download them from.

Reusable by any test that needs CIFAR-10 without the network:

* ``write_cifar_folder(root)`` writes ``root/cifar-10-batches-py/`` (data_batch_1..5, test_batch,
  batches.meta) with ``n_per_batch`` random 32x32 RGB images per batch file;
* ``make_cifar_archive(dir)`` packs that folder as ``dir/cifar-10-python.tar.gz`` and returns its md5;
* ``serve_directory(dir)`` serves a folder on 127.0.0.1 (an ephemeral port) in a thread.

Batch files are protocol-2 pickles of ``{b"batch_label", b"labels", b"data", b"filenames"}`` like the
official ones. ``style="py3"`` is what ``pickle.dump(protocol=2)`` writes under Python 3 (byte strings
spelled ``_codecs.encode(str, "latin1")``); ``style="py2"`` writes byte strings as BINSTRING opcodes and
names ``numpy.core.multiarray._reconstruct``, as the official files (pickled by Python 2) do.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import pickle
import socket
import struct
import tarfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]

_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1, dtype=np.uint8))[0]


class _Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """The pure-Python pickler, writing str and bytes as Python 2 ``str`` (BINSTRING) opcodes."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_string(self, obj: str | bytes) -> None:
        """SHORT_BINSTRING / BINSTRING: loads as bytes under ``encoding="bytes"``."""
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_string
    dispatch[str] = save_py2_string

    def save_global(self, obj: Any, name: str | None = None) -> None:
        """Spell numpy's ``_reconstruct`` the numpy 1.x way, as in the official files."""
        if obj is _NUMPY_RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def pickle_bytes(obj: Any, style: str = "py3") -> bytes:
    """``obj`` as a protocol-2 pickle in the given style ("py3" or "py2", see the module docstring)."""
    if style == "py3":
        return pickle.dumps(obj, protocol=2)
    if style == "py2":
        buf = io.BytesIO()
        _Py2StylePickler(buf, protocol=2).dump(obj)
        return buf.getvalue()
    raise ValueError(f"unknown pickle style {style!r}")


def make_batch(n: int, seed: int, label: str) -> dict[bytes, Any]:
    """One batch dict in the official layout: ``n`` random images (rows of 3072 uint8) and labels 0..9."""
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def write_cifar_folder(
    root: str | Path,
    n_per_batch: int = 20,
    seed: int = 0,
    *,
    style: str = "py3",
    overrides: Mapping[str, bytes] | None = None,
) -> dict[str, dict[bytes, Any]]:
    """Write ``root/cifar-10-batches-py/`` and return the batch dicts by file name.

    ``overrides`` replaces a file's bytes (e.g. a malicious pickle as ``test_batch``).
    """
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    batches: dict[str, dict[bytes, Any]] = {}
    for i, fname in enumerate((*TRAIN_FILES, TEST_FILE)):
        batches[fname] = make_batch(n_per_batch, seed * 100 + i, f"batch {fname}")
        (folder / fname).write_bytes(pickle_bytes(batches[fname], style))
    meta = {b"num_cases_per_batch": n_per_batch, b"label_names": LABEL_NAMES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle_bytes(meta, style))
    for fname, data in (overrides or {}).items():
        (folder / fname).write_bytes(data)
    return batches


def file_md5(path: str | Path) -> str:
    """md5 hex digest of a file."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def make_cifar_archive(
    dir: str | Path,
    n_per_batch: int = 20,
    seed: int = 0,
    *,
    style: str = "py3",
    name: str = ARCHIVE,
) -> tuple[Path, str]:
    """Write ``dir/<name>`` (a .tar.gz holding ``cifar-10-batches-py/...``); return (path, md5)."""
    dir = Path(dir)
    staging = dir / ".staging"
    write_cifar_folder(staging, n_per_batch, seed, style=style)
    path = dir / name
    with tarfile.open(path, "w:gz") as tar:
        tar.add(staging / FOLDER, arcname=FOLDER)
    for f in (staging / FOLDER).iterdir():
        f.unlink()
    (staging / FOLDER).rmdir()
    staging.rmdir()
    return path, file_md5(path)


def write_tar(path: str | Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> str:
    """Write a .tar.gz from raw ``(TarInfo, content)`` pairs (content None for non-files); return its md5."""
    with tarfile.open(path, "w:gz") as tar:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return file_md5(path)


def valid_members(n_per_batch: int = 4, seed: int = 0) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The members of a valid archive (folder entry and batch files), to mix an unsafe member into."""
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    folder = tarfile.TarInfo(FOLDER)
    folder.type = tarfile.DIRTYPE
    folder.mode = 0o755
    members.append((folder, None))
    for i, fname in enumerate((*TRAIN_FILES, TEST_FILE)):
        info = tarfile.TarInfo(f"{FOLDER}/{fname}")
        members.append((info, pickle_bytes(make_batch(n_per_batch, seed * 100 + i, fname))))
    return members


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files without logging; ``truncate_to`` sends the full Content-Length but fewer bytes."""

    truncate_to: int | None = None

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean."""

    def copyfile(self, source: Any, outputfile: Any) -> None:
        """Send the file, or only its first ``truncate_to`` bytes (then the connection closes)."""
        if self.truncate_to is None:
            super().copyfile(source, outputfile)
        else:
            outputfile.write(source.read(self.truncate_to))


@contextlib.contextmanager
def serve_directory(dir: str | Path, *, truncate_to: int | None = None) -> Iterator[str]:
    """Serve ``dir`` over HTTP on 127.0.0.1 (ephemeral port) in a thread; yield the base URL.

    Only the loopback interface is bound. The server is shut down (port closed) on exit.
    """
    handler_cls = type("_Handler", (_QuietHandler,), {"truncate_to": truncate_to})
    handler = functools.partial(handler_cls, directory=str(dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_url(path: str = ARCHIVE) -> str:
    """A URL on a loopback port nothing listens on (connections are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"
