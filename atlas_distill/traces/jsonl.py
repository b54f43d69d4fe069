"""JSONL trace files (plain or .gz, or - for stdin/stdout), read and written safely.

Reading names file:line for any malformed line (or skips and counts it).
Writing goes to a temporary file beside the target that is renamed over it
only once complete, so an interrupted export leaves the previous complete file
or nothing, never a truncated one.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..errors import InvalidTraceData, NoTracesFound, OutputError
from .json_codec import loads
from .filters import FunnelStage, TraceFilter
from .record import AtlasSession, RecordError


def open_trace_file(path: str) -> IO[bytes]:
    """The file opened for reading, or InvalidTraceData naming why it cannot be (before any other work)."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InvalidTraceData(f"Trace file {path} does not exist.",
                               fix="Check the path, or create it with `atlas-distill export`.") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise InvalidTraceData(f"Trace file {path} cannot be read: {exc.strerror}.",
                               fix="Pass a readable .jsonl or .jsonl.gz file.") from None


def _decompressed(handle: IO[bytes]) -> IO[bytes]:
    """The file's lines: gunzipped when it starts with gzip's magic bytes, else as they are."""
    gzipped = handle.read(2) == b"\x1f\x8b"
    handle.seek(0)
    return gzip.open(handle, "rb") if gzipped else handle


def _comment(raw: bytes) -> bool:
    """A `#` line: the SDK's own trace files open with one."""
    return raw.lstrip().startswith(b"#")


def check_trace_file(path: str | None) -> None:
    """Fail now, with the error reading would give, when a trace file cannot be opened or holds no session line
    (only blank and `#` lines); stdin passes. Reads up to the first session line only."""
    if not path or path == "-":
        return
    with open_trace_file(path) as handle:
        try:
            if any(raw.strip() and not _comment(raw) for raw in _decompressed(handle)):
                return
        except (OSError, EOFError, zlib.error):  # damaged: reading says where
            return
    raise _empty(path)


def _empty(path: str) -> NoTracesFound:
    return NoTracesFound(f"Trace file {path} is empty: it holds no sessions.",
                         fix="Export sessions into it with `atlas-distill export --output ...`.")


class JsonlTraceSource:
    """Sessions from a JSONL file written by arc-atlas or by `atlas-distill export`. A line starting with `#`
    (the SDK's trace files open with one) is a comment: counted in `comments`, never an error."""

    def __init__(self, path: str | Path, filters: TraceFilter | None = None, *, skip_invalid: bool = False):
        self.path = str(path)
        self.filters = filters
        self.skip_invalid = skip_invalid
        self.read_lines = 0
        self.valid = 0
        self.invalid = 0
        self.comments = 0
        self.stopped_at_limit = False
        self._stages = filters.stages() if filters is not None else []
        self._removed = [0] * len(self._stages)  # sessions each filter removed (the first one that failed)

    @property
    def filtered_out(self) -> int:
        """Sessions the filters removed."""
        return sum(self._removed)

    @property
    def funnel(self) -> list[FunnelStage]:
        """As Postgres reports it: the valid sessions read, then how many remain after each filter in turn."""
        where = "standard input" if self.path == "-" else self.path
        funnel = [FunnelStage(f"sessions read from {where}" if self.stopped_at_limit else f"sessions in {where}",
                              self.valid)]
        for stage, removed in zip(self._stages, self._removed, strict=True):
            funnel.append(FunnelStage(stage.label, funnel[-1].remaining - removed))
        if self.stopped_at_limit:
            funnel.append(FunnelStage(f"limit {self.filters.limit}", self.filters.limit))
        return funnel

    def _open(self) -> IO[bytes]:
        return sys.stdin.buffer if self.path == "-" else _decompressed(open_trace_file(self.path))

    def _reject(self, lineno: int, problem: str) -> None:
        self.invalid += 1
        if not self.skip_invalid:
            raise InvalidTraceData(
                f"{self.path}:{lineno}: {problem}.",
                fix="Fix or remove that line, or pass --skip-invalid to skip malformed lines and count them.",
            )

    def __iter__(self) -> Iterator[AtlasSession]:
        limit = self.filters.limit if self.filters else None
        kept = 0
        handle = self._open()
        try:
            for lineno, raw in enumerate(handle, start=1):
                self.read_lines = lineno
                if not raw.strip():
                    continue
                if _comment(raw):
                    self.comments += 1
                    continue
                try:
                    value = loads(raw)
                    session = AtlasSession.from_json(value)
                except UnicodeDecodeError as exc:
                    self._reject(lineno, f"not valid UTF-8 (byte {exc.start})")
                    continue
                except json.JSONDecodeError as exc:
                    self._reject(lineno, f"not valid JSON: {exc.msg} at column {exc.colno}")
                    continue
                except RecordError as exc:
                    self._reject(lineno, f"not an Atlas session: {exc}")
                    continue
                self.valid += 1
                failed = next((i for i, stage in enumerate(self._stages) if not stage.keeps(session)), None)
                if failed is not None:
                    self._removed[failed] += 1
                    continue
                yield session
                kept += 1
                if limit is not None and kept >= limit:
                    self.stopped_at_limit = True
                    return
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise InvalidTraceData(f"{self.path}: cannot be read to the end: {exc}.",
                                   fix="The file is damaged or truncated; export it again.") from None
        finally:
            if handle is not sys.stdin.buffer:
                handle.close()
        if self.valid == 0 and self.invalid == 0:
            raise _empty(self.path)


class JsonlTraceSink:
    """Writes sessions one per line; commit() renames into place, abort() leaves no trace."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.bytes_written = 0
        self._tmp: str | None = None
        if self.path == "-":
            self._handle: IO[bytes] = sys.stdout.buffer
            return
        target = Path(self.path)
        if target.is_dir():
            raise OutputError(f"Cannot write to {self.path}: it is a directory.",
                              fix="Pass a file path such as traces/runtime.jsonl.")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        except OSError as exc:
            raise OutputError(f"Cannot write to {self.path}: {exc.strerror}.",
                              fix="Choose a writable --output path.") from None
        raw = os.fdopen(fd, "wb")
        self._handle = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if self.path.endswith(".gz") else raw
        self._raw = raw

    def write(self, session: AtlasSession) -> None:
        try:
            line = session.to_json_bytes() + b"\n"
        except RecursionError:
            raise InvalidTraceData(f"Session {session.session_id} holds a value nested too deeply (about 1,000 "
                                   "levels of lists or objects) to write as JSON.",
                                   fix="Flatten that value where the session is stored, or leave the session "
                                   "out.") from None
        try:
            self._handle.write(line)
        except BrokenPipeError:
            raise  # the reader of stdout went away: the CLI ends quietly
        except OSError as exc:
            self.abort()
            raise OutputError(f"Writing {self.path} failed: {exc.strerror}.",
                              fix="Free disk space or choose another --output path.") from None
        self.bytes_written += len(line)

    def commit(self) -> None:
        if self._tmp is None:
            self._handle.flush()
            return
        try:
            if self._handle is not self._raw:
                self._handle.close()  # writes the gzip trailer; leaves the raw file open
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.chmod(self._tmp, 0o644)
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self.abort()
            raise OutputError(f"Finishing {self.path} failed: {exc.strerror}.",
                              fix="Free disk space or choose another --output path.") from None
        self._tmp = None

    def abort(self) -> None:
        if self._tmp is None:
            return
        for handle in {self._handle, self._raw}:
            try:
                handle.close()
            except OSError:
                pass
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
        self._tmp = None
