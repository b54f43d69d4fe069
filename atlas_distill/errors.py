"""Typed domain errors. Each carries the fix and the exit code the CLI returns.

Exit codes are part of the interface (scripts branch on them) and are listed in
the README:

    0  ok
    1  usage or configuration error (bad flag, profile key, override, model spec)
    2  no data: nothing matched the filters, or the input is empty
    3  targets not met, where the command was asked to check them
    4  database error: unreachable, authentication failed, schema missing
    5  invalid input data: a malformed trace file or record, a teacher store that is foreign, incomplete or damaged
    6  output error: the output path cannot be written
    7  training failed: out of memory, non-finite loss, hardware not available
    8  invalid run: a RUN given to compare has no summary.json, or it is not valid
"""

from __future__ import annotations


class AtlasDistillError(Exception):
    """Base class: a message that names the problem, and the fix."""

    exit_code = 1

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} {self.fix}" if self.fix else self.message


class UsageError(AtlasDistillError):
    """A flag or argument that cannot be used as given."""


class ProfileError(AtlasDistillError):
    """A profile that does not exist or does not validate; lists every problem."""

    def __init__(self, problems: list[str], *, fix: str | None = None) -> None:
        self.problems = problems
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems in the configuration:"
        body = "" if len(problems) == 1 else "\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(head + body, fix=fix)


class NoTracesFound(AtlasDistillError):
    """Nothing to work on: the filters matched no session, or the file is empty."""

    exit_code = 2


class TargetsNotMet(AtlasDistillError):
    exit_code = 3


class DatabaseError(AtlasDistillError):
    """The database could not be reached, refused us, or lacks the Atlas schema."""

    exit_code = 4


class DatabaseConnectionLost(DatabaseError):
    """The connection dropped mid-read and every reconnection attempt failed; says how far the read got."""

    def __init__(self, message: str, *, sessions_read: int, attempts: int, last_error: str,
                 fix: str | None = None) -> None:
        self.sessions_read = sessions_read
        self.attempts = attempts
        self.last_error = last_error
        super().__init__(message, fix=fix)


class InvalidTraceData(AtlasDistillError):
    """A trace file line or record that is not a valid Atlas session."""

    exit_code = 5


class TeacherStoreError(AtlasDistillError):
    """A teacher store built for another teacher, tokenizer, max_length or data; unfinished; or damaged."""

    exit_code = 5


class OutputError(AtlasDistillError):
    exit_code = 6


class ModelSpecError(AtlasDistillError):
    """A model spec that does not resolve, or models that cannot be used together."""


def out_of_memory(exc: BaseException) -> bool:
    """Whether a RuntimeError from torch is an allocation failure (CUDA's "out of memory", the CPU allocator's)."""
    text = str(exc)
    return "out of memory" in text.lower() or "DefaultCPUAllocator" in text


class TrainingError(AtlasDistillError):
    """Training could not run or stopped: out of memory, a non-finite loss, a missing dependency."""

    exit_code = 7


class InvalidRunSummary(AtlasDistillError):
    """A run (directory or summary.json) that `compare` cannot read: missing, not JSON, fields missing or ill-typed."""

    exit_code = 8
