"""Logging set-up (rank 0 writes to the console and log.txt) and the metrics.jsonl / TensorBoard writer."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from utils.checkpoint import DiskFullError, atomic_write
from utils.errors import out_of_space

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_EARLY_RECORDS_KEPT = 10_000
_FILE_MODE = 0o666  # before the umask, as open() does


class _EarlyRecords(logging.Handler):
    """Keeps the records logged before the run directory is chosen, so log.txt starts at the first line."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < _EARLY_RECORDS_KEPT:
            self.records.append(record)


def _remove_our_handlers(root: logging.Logger) -> list[logging.Handler]:
    ours = [h for h in root.handlers if getattr(h, "_ivt_handler", False)]
    for handler in ours:
        root.removeHandler(handler)
        handler.close()
    return ours


_LEVEL_BEFORE: list[int] = []  # the root logger's level before the first setup_logging, for reset_logging


def reset_logging() -> None:
    """Undo :func:`setup_logging`: its handlers removed and closed, the root level as it was before the first call
    (a process that runs several commands, such as a test session, starts each from the same logging state)."""
    root = logging.getLogger()
    _remove_our_handlers(root)
    if _LEVEL_BEFORE:
        root.setLevel(_LEVEL_BEFORE[0])


def setup_logging(output_dir: str | Path | None, rank: int = 0) -> None:
    """Rank 0 logs INFO to stderr and ``output_dir/log.txt``; other ranks log warnings only.

    Without ``output_dir`` the records are also kept in memory; the next call with an ``output_dir`` writes them
    to log.txt first. A run thus logs from its first line while the run directory stays untouched until the
    run has started for good.
    """
    root = logging.getLogger()
    if not _LEVEL_BEFORE:
        _LEVEL_BEFORE.append(root.level)
    early = [h for h in _remove_our_handlers(root) if isinstance(h, _EarlyRecords)]
    level = logging.INFO if rank == 0 else logging.WARNING
    root.setLevel(level)
    formatter = logging.Formatter(_FORMAT if rank == 0 else f"[rank {rank}] " + _FORMAT, _DATE_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if output_dir is None:
        handlers.append(_EarlyRecords())
    elif rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        log_file = _RunLogHandler(Path(output_dir) / "log.txt")
        log_file.setFormatter(formatter)
        for record in (early[0].records if early else []):
            log_file.handle(record)
        handlers.append(log_file)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.setLevel(level)
        handler._ivt_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def interactive() -> bool:
    """Whether stderr is a terminal: progress bars only there (under nohup or SLURM they flood the log file)."""
    return sys.stderr.isatty()


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard when installed.

    Each record is one ``write`` of a whole line, so a crash leaves at most a torn last line, which
    :func:`read_metrics` skips; a full disk leaves no part of the line (see :func:`append_whole_line`).
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tb"))
            except Exception:  # tensorboard is optional
                self._tb = None

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        append_whole_line(self.path, json.dumps(record, default=float) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def write_text(self, tag: str, text: str) -> None:
        """Free text once per run (the resolved config, as hyperparameters) in TensorBoard."""
        if self._tb is not None:
            self._tb.add_text(tag, text)

    def keep_until(self, step: int) -> int:
        """Drop the records after global step ``step`` (the steps a resumed run redoes); returns how many."""
        if not self.enabled or not self.path.is_file():
            return 0
        records = read_metrics(self.path)
        kept = "".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step)
        atomic_write(self.path, lambda handle: handle.write(kept.encode()))
        return len(records) - kept.count("\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def append_whole_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path``, or nothing at all: a write that runs out of space is cut back to the old end.

    DiskFullError (one line, naming the file) when the disk is full; the file keeps its whole lines.
    """
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            reason = out_of_space(exc)
            if reason is None:
                raise
            os.ftruncate(fd, end)
            raise DiskFullError(f"{reason}: could not append a record to {path} "
                                f"({shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free); its lines so far "
                                "are whole and the last saved checkpoint is intact: free space, then resume with "
                                "--resume auto") from None
    finally:
        os.close(fd)


class _RunLogHandler(logging.FileHandler):
    """log.txt; on a full disk it says so once on the console and stops, instead of a block per record."""

    def handleError(self, record: logging.LogRecord) -> None:
        reason = out_of_space(sys.exc_info()[1])
        if reason is None:
            super().handleError(record)
            return
        self.setLevel(logging.CRITICAL + 1)
        sys.stderr.write(f"{self.baseFilename}: {reason}, no further lines written there (the console has them)\n")

    def close(self) -> None:
        try:
            super().close()
        except OSError as exc:  # the lines the full disk refused stay on the console only
            if out_of_space(exc) is None:
                raise


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn (partial) line left by a crash is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
