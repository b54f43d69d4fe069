"""Export under faults, for real: SIGKILL mid-write, a backend terminated mid-stream, a drop that persists.

Timing is made deterministic by freezing the export (SIGSTOP) once its temporary file holds
data, doing the damage while it is frozen, then letting it continue (SIGCONT). The database
is large enough (about 48 MB of sessions) that the frozen export is always mid-stream: far
more than the kernel's socket buffers can hold.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from atlas_distill.db import connect
from atlas_distill.errors import DatabaseConnectionLost
from atlas_distill.export import APPLICATION_NAME
from atlas_distill.traces import PostgresTraceSource, TraceFilter
from atlas_distill.traces.seed import seed_database
from conftest import CLI, _create_database, _drop_database
from helpers import db_ids

SESSIONS = 3000
EVERYTHING = ["--all-statuses", "trainer.min_reward=null"]


@pytest.fixture(scope="module")
def big_db(pg_server) -> str:
    """3,000 synthetic sessions (seed 3): an export of it takes long enough to be caught mid-write."""
    name, url = _create_database(pg_server)
    seed_database(url, SESSIONS, seed=3)
    yield url
    _drop_database(pg_server, name)


def start_export(url: str, cwd: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("ATLAS_DB_URL", "PGPASSWORD")}
    return subprocess.Popen([str(CLI), "export", "--database-url", url, *EVERYTHING, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def freeze_mid_write(proc: subprocess.Popen, directory: Path, name: str) -> Path:
    """Wait until the export's temporary file holds data, then stop the process there; returns that file."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the export ended before it was caught mid-write: {proc.communicate()}"
        for temp in directory.glob(f".{name}.*"):
            try:
                if temp.stat().st_size > 0:
                    os.kill(proc.pid, signal.SIGSTOP)
                    # Frozen with its temporary file still unpublished: provably mid-export.
                    assert temp.exists(), "the export finished first"
                    return temp
            except FileNotFoundError:
                pass
        time.sleep(0.002)
    raise AssertionError("the export never started writing")


def terminate_backend(server: str, url: str, application_name: str = APPLICATION_NAME) -> None:
    """pg_terminate_backend on the backend serving that application on that database; waits until it is gone."""
    where = "application_name = %s AND datname = %s"
    params = (application_name, conninfo_to_dict(url)["dbname"])
    with connect(server, autocommit=True) as admin:
        deadline = time.monotonic() + 30
        while not admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {where}",
                                params).fetchall():
            assert time.monotonic() < deadline, "the export's connection never showed in pg_stat_activity"
            time.sleep(0.01)
        while admin.execute(f"SELECT 1 FROM pg_stat_activity WHERE {where}", params).fetchall():
            assert time.monotonic() < deadline, "the terminated backend did not go away"
            time.sleep(0.01)


def exported_ids(path: Path) -> list[int]:
    with path.open("rb") as handle:
        return [json.loads(line)["session_metadata"]["session_id"] for line in handle]


@pytest.mark.parametrize("previous", [False, True], ids=["no-previous-file", "previous-file"])
def test_kill_9_mid_write_leaves_the_previous_file_or_nothing(big_db, tmp_path, previous):
    target = tmp_path / "big.jsonl"
    if previous:
        done = subprocess.run([str(CLI), "export", "--database-url", big_db, *EVERYTHING, "--limit", "40",
                               "--output", "big.jsonl"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        before = target.read_bytes()
    proc = start_export(big_db, tmp_path, "--output", "big.jsonl")
    temp = freeze_mid_write(proc, tmp_path, "big.jsonl")
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    if previous:
        assert target.read_bytes() == before
    else:
        assert not target.exists()
    # SIGKILL runs no cleanup, so the temporary file may stay: hidden, and named as what it is.
    leftovers = {p for p in tmp_path.iterdir() if p != target}
    assert leftovers <= {temp} and temp.name.startswith(".big.jsonl.") and temp.name.endswith(".partial")

    again = subprocess.run([str(CLI), "export", "--database-url", big_db, *EVERYTHING, "--output", "big.jsonl"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert exported_ids(target) == db_ids(big_db)
    assert {p for p in tmp_path.iterdir() if p != target} <= leftovers


def test_a_terminated_backend_is_reconnected_and_the_export_resumes_exactly(big_db, pg_server, tmp_path):
    proc = start_export(big_db, tmp_path, "--output", "big.jsonl", "--json")
    freeze_mid_write(proc, tmp_path, "big.jsonl")
    terminate_backend(pg_server, big_db)
    os.kill(proc.pid, signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["reconnects"] == 1 and summary["exported"] == SESSIONS
    # The reason is the server's FATAL message or, when the socket closes before the client reads it,
    # libpq's "server closed the connection unexpectedly"; both were seen here.
    assert re.search(r"lost the database connection after \d+ sessions \((.*administrator command|.*server closed "
                     r"the connection unexpectedly)", stderr), stderr
    assert "reconnecting in 0.5 s (attempt 1 of 3)" in stderr
    ids = exported_ids(tmp_path / "big.jsonl")
    assert len(ids) == len(set(ids))  # no session twice
    assert ids == db_ids(big_db)  # none missing, in id order
    assert [p.name for p in tmp_path.iterdir()] == ["big.jsonl"]


def test_a_drop_that_persists_exits_4_with_the_count_and_no_file(big_db, pg_server, tmp_path):
    proc = start_export(big_db, tmp_path, "--output", "big.jsonl", "--retries", "2", "--json")
    temp = freeze_mid_write(proc, tmp_path, "big.jsonl")
    written = temp.read_bytes().count(b"\n")
    dbname = conninfo_to_dict(big_db)["dbname"]
    with connect(pg_server, autocommit=True) as admin:
        # No one, superusers included, may connect to it now: every reconnection fails.
        admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS false")
    try:
        terminate_backend(pg_server, big_db)
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)
        waited = time.monotonic() - started
    finally:
        with connect(pg_server, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS true")
    assert proc.returncode == 4, stderr
    error = json.loads(stdout)
    assert error["exit_code"] == 4 and error["error"]["type"] == "DatabaseConnectionLost"
    count = int(re.search(r"after (\d+) sessions had been exported", stderr)[1])
    assert written <= count < SESSIONS
    assert "2 reconnection attempts failed" in stderr and "is not currently accepting connections" in stderr
    assert "nothing was written to big.jsonl" in stderr and "Traceback" not in stderr
    assert waited >= 1.5  # it did wait 0.5 s, then 1 s, before giving up
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file


def test_source_resumes_within_its_limit_after_a_drop(big_db, pg_server):
    name = f"atlas-distill test {uuid.uuid4().hex[:8]}"
    reconnects = []
    source = PostgresTraceSource(big_db, TraceFilter(review_status=None, limit=2500), fetch_size=10, backoff=0.01,
                                 application_name=name, on_reconnect=reconnects.append)
    got = []
    for session in source:
        got.append(session.session_id)
        if len(got) == 5:
            terminate_backend(pg_server, big_db, name)
    assert got == db_ids(big_db)[:2500]
    assert source.reconnects == 1 and len(reconnects) == 1
    assert 5 <= reconnects[0].sessions_read < 2500 and reconnects[0].attempt == 1


def test_source_without_retries_reports_how_far_it_read(big_db, pg_server):
    name = f"atlas-distill test {uuid.uuid4().hex[:8]}"
    source = PostgresTraceSource(big_db, TraceFilter(review_status=None), retries=0, application_name=name)
    got = []
    with pytest.raises(DatabaseConnectionLost) as caught:
        for session in source:
            got.append(session.session_id)
            if len(got) == 5:
                terminate_backend(pg_server, big_db, name)
    assert caught.value.sessions_read == len(got) and 5 <= len(got) < SESSIONS
    assert caught.value.exit_code == 4 and "no reconnection was attempted" in caught.value.message


def read_some_then_freeze(proc: subprocess.Popen, size: int = 200_000) -> list[str]:
    """With --output -, the export blocks on the pipe we do not read: read `size` characters of it, then stop
    the process there (provably mid-stream: 3,000 sessions are about 48 MB). Returns what was read."""
    head = proc.stdout.read(size)
    os.kill(proc.pid, signal.SIGSTOP)
    return head


def stdout_ids(text: str) -> list[int]:
    assert text.endswith("\n"), "stdout ends in a cut line"
    return [json.loads(line)["session_metadata"]["session_id"] for line in text.splitlines()]


def test_export_to_stdout_reconnects_and_its_table_shows_the_reconnect(big_db, pg_server, tmp_path):
    proc = start_export(big_db, tmp_path, "--output", "-")
    head = read_some_then_freeze(proc)
    terminate_backend(pg_server, big_db)
    os.kill(proc.pid, signal.SIGCONT)
    rest, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert stdout_ids(head + rest) == db_ids(big_db)  # every session once, in id order
    assert "reconnecting in 0.5 s (attempt 1 of 3)" in stderr
    # the summary table goes to stderr when the sessions take stdout
    assert re.search(r"reconnects\s*│\s*1\s*│", stderr), stderr
    assert re.search(rf"sessions\s*│\s*{SESSIONS}\s*│", stderr), stderr


def test_a_lost_export_to_stdout_says_the_sessions_it_wrote_are_there(big_db, pg_server, tmp_path):
    proc = start_export(big_db, tmp_path, "--output", "-", "--retries", "1")
    head = read_some_then_freeze(proc)
    dbname = conninfo_to_dict(big_db)["dbname"]
    with connect(pg_server, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS false")
    try:
        terminate_backend(pg_server, big_db)
        os.kill(proc.pid, signal.SIGCONT)
        rest, stderr = proc.communicate(timeout=120)
    finally:
        with connect(pg_server, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS true")
    assert proc.returncode == 4, stderr
    count = int(re.search(r"after (\d+) sessions had been exported", stderr)[1])
    ids = stdout_ids(head + rest)
    assert len(ids) == count and ids == db_ids(big_db)[:count] and count < SESSIONS  # exactly what it says
    message = " ".join(stderr.split())
    assert "they went to stdout, which therefore holds an incomplete export" in message
    assert "1 reconnection attempt failed" in message and "Traceback" not in stderr


def test_a_connection_that_cannot_be_opened_at_the_start_is_not_retried(big_db, pg_server, tmp_path):
    dbname = conninfo_to_dict(big_db)["dbname"]
    with connect(pg_server, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS false")
    try:
        proc = start_export(big_db, tmp_path, "--output", "big.jsonl", "--retries", "5")
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        with connect(pg_server, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS true")
    assert proc.returncode == 4, stderr
    assert "Cannot connect to the database" in stderr and "is not currently accepting connections" in stderr
    assert "reconnect" not in stderr  # no attempt was made, none was announced
    assert list(tmp_path.iterdir()) == []
