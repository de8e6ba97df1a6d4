"""Trials MLflow has not taken yet, kept on disk until it does: one JSON file per trial.

Every trial's payload (``payload.trial_payload``: everything its child run holds, curves included) is
written here before it is sent, and removed once MLflow has it. So a trial whose run could not be logged
(the server down, the process killed) is still here when the study's command runs again, and that run logs
it (``tracker._backfill``), once: a trial that already has a finished run is only removed. The folder is
``<spool_dir>/<study name>/``; ``spool_dir`` defaults to ``mlflow-spool/`` beside the journal file (the
working directory for a database storage), so the same command finds it again. A spool that cannot be
written (read-only folder, full disk) is one warning: those trials can still be logged later from the
study's storage, without their curves.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from initsearch.errors import first_line
from initsearch.search.settings import is_rdb

log = logging.getLogger("initsearch")

DEFAULT_FOLDER = "mlflow-spool"
_UNSAFE = re.compile(r"[^\w.\-]")


def spool_folder(settings: Any) -> Path | None:
    """``<spool_dir>/<study name>`` of ``settings`` (absolute), or ``None`` when they do not say."""
    name = getattr(settings, "study_name", None)
    storage = getattr(settings, "storage", None)
    if not isinstance(name, str) or not isinstance(storage, str):
        return None
    tracking = getattr(settings, "tracking", None)
    root = getattr(tracking, "spool_dir", None)
    if root:
        base = Path(root).expanduser()
    elif is_rdb(storage):
        base = Path(DEFAULT_FOLDER)
    else:
        base = Path(storage).expanduser().parent / DEFAULT_FOLDER
    return base.absolute() / (_UNSAFE.sub("_", name) or "study")


class Spool:
    """The undelivered trials of one study in one folder (``trial-<number>.json``: the worker that ran it,
    its tracker, and the payload). Files are written whole (a temporary file renamed), so a reader never sees half."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.broken: str | None = None  # why it cannot be written (warned once)

    def path(self, number: int) -> Path:
        return self.folder / f"trial-{int(number)}.json"

    def keep(self, payload: dict[str, Any], worker: str, owner: str = "") -> bool:
        """Write ``payload`` (trial ``payload["number"]``) of process ``worker`` (a ``worker_id``) and its
        tracker ``owner``; ``False`` (one warning per process) when it cannot be written."""
        target = self.path(payload["number"])
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"worker": worker, "owner": owner, "payload": payload}))
            os.replace(tmp, target)
        except (OSError, TypeError, ValueError) as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            if self.broken is None:
                self.broken = first_line(exc, with_type=True, limit=300)
                log.warning("MLflow tracking: cannot keep undelivered trials in %s (%s); a trial MLflow misses "
                            "is logged later from the study's storage, without its curves", self.folder, self.broken)
            return False
        return True

    def drop(self, number: int) -> None:
        try:
            self.path(number).unlink(missing_ok=True)
        except OSError as exc:
            log.debug("MLflow tracking: cannot remove %s (%s)", self.path(number), exc)

    def numbers(self) -> list[int]:
        """The trial numbers kept here, in order."""
        try:
            names = [p.name for p in self.folder.iterdir()]
        except OSError:
            return []
        found = []
        for name in names:
            stem = name[len("trial-"):-len(".json")] if name.startswith("trial-") and name.endswith(".json") else ""
            if stem.isdigit():
                found.append(int(stem))
        return sorted(found)

    def load(self, number: int) -> tuple[str, str, dict[str, Any]] | None:
        """``(worker, owner, payload)`` of trial ``number``, or ``None`` when it is gone or unreadable."""
        try:
            entry = json.loads(self.path(number).read_text())
            return str(entry["worker"]), str(entry.get("owner", "")), dict(entry["payload"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def __len__(self) -> int:
        return len(self.numbers())
