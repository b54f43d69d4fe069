"""`atlas-distill export` through the real console script, against a real server."""

from __future__ import annotations

import gzip
import json
import subprocess

import pytest

from atlas_distill.db import connect

from helpers import db_ids


def exported_ids(path):
    return [json.loads(line)["session_metadata"]["session_id"] for line in path.read_text().splitlines()]


def test_export_writes_the_filtered_sessions_and_a_summary(cli, seeded_db, tmp_path):
    result = cli("export", "--database-url", seeded_db, "--min-reward", "0.8", "--output", "out/runtime.jsonl")
    assert result.code == 0, result.stderr
    expected = db_ids(seeded_db, "review_status = 'approved' AND (reward_stats->>'score')::float >= 0.8")
    assert exported_ids(tmp_path / "out/runtime.jsonl") == expected
    assert f"Exported {len(expected)} sessions" in result.stdout
    assert "skipped by reward >= 0.8" in result.stdout


def test_export_json_summary_and_profile_defaults(cli, seeded_db, tmp_path):
    result = cli("export", "--database-url", seeded_db, "--profile", "fast", "--json", "--include-status", "pending")
    assert result.code == 0, result.stderr
    summary = result.json()
    expected = db_ids(seeded_db, "review_status IN ('approved', 'pending') AND (reward_stats->>'score')::float >= 0.7")
    assert summary["exported"] == len(expected)  # fast profile: min_reward 0.7
    assert exported_ids(tmp_path / "traces/runtime.jsonl") == expected
    assert summary["funnel"][0] == {"filter": "sessions in database", "remaining": 300}
    assert summary["bytes"] == (tmp_path / "traces/runtime.jsonl").stat().st_size
    assert sum(summary["skipped"].values()) == 300 - len(expected)


def test_overrides_and_flags(cli, seeded_db, tmp_path):
    result = cli("export", "--database-url", seeded_db, "trainer.min_reward=null", "data.review_status=null",
                 "--status", "failed", "--limit", "4", "--output", "x.jsonl.gz", "--json")
    assert result.code == 0, result.stderr
    with gzip.open(tmp_path / "x.jsonl.gz", "rt") as handle:
        got = [json.loads(line)["session_metadata"]["session_id"] for line in handle]
    assert got == db_ids(seeded_db, "status = 'failed'")[:4]
    all_statuses = cli("export", "--database-url", seeded_db, "--all-statuses", "--min-reward", "0",
                       "--session-id", "3", "--session-id", "8", "--output", "y.jsonl", "--json")
    assert all_statuses.code == 0, all_statuses.stderr
    assert exported_ids(tmp_path / "y.jsonl") == [i for i in (3, 8) if i in db_ids(seeded_db, "reward_stats IS NOT NULL")]


def test_output_dash_streams_jsonl_to_stdout(cli, seeded_db):
    result = cli("export", "--database-url", seeded_db, "--output", "-", "--limit", "5", "--min-reward", "0")
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and all(json.loads(line)["task"] for line in lines)
    assert "Exported 5 sessions" in result.stderr


def test_nothing_matches_exit_2_with_the_funnel_and_advice(cli, seeded_db, tmp_path):
    previous = tmp_path / "traces" / "runtime.jsonl"
    previous.parent.mkdir()
    previous.write_text("previous\n")
    result = cli("export", "--database-url", seeded_db, "--learning-key", "no_such_workflow")
    assert result.code == 2
    assert "No conversations found in database" in result.stderr
    assert "learning_key = 'no_such_workflow'" in result.stderr and "left none" in result.stderr
    for advice in ("ATLAS_DB_URL", "--min-reward", "learning_key=null"):
        assert advice in result.stderr
    assert previous.read_text() == "previous\n"
    assert [p.name for p in previous.parent.iterdir()] == ["runtime.jsonl"]
    as_json = cli("export", "--database-url", seeded_db, "--learning-key", "no_such_workflow", "--json")
    assert as_json.code == 2 and as_json.json()["error"]["type"] == "NoSessionsMatched"


def test_injection_attempt_is_data(cli, seeded_db):
    result = cli("export", "--database-url", seeded_db, "--learning-key", "x'; DROP TABLE sessions; --")
    assert result.code == 2
    assert len(db_ids(seeded_db)) == 300


def test_no_database_url_is_a_usage_error(cli):
    result = cli("export")
    assert result.code == 1
    assert "No database URL given" in result.stderr and "ATLAS_DB_URL" in result.stderr


def test_atlas_db_url_from_the_environment(cli, seeded_db, tmp_path):
    result = cli("export", "--limit", "2", "--min-reward", "0", "--json", env={"ATLAS_DB_URL": seeded_db})
    assert result.code == 0, result.stderr
    assert result.json()["exported"] == 2


def test_unreachable_server_exit_4_one_paragraph(cli, tmp_path):
    result = cli("export", "--database-url", "postgresql://atlas:hunter2secret@127.0.0.1:1/atlas")
    assert result.code == 4
    assert "Cannot connect to the database" in result.stderr and "Traceback" not in result.stderr
    assert "hunter2secret" not in result.stderr + result.stdout
    assert "postgresql://atlas:***@127.0.0.1:1/atlas" in result.stderr
    assert not (tmp_path / "traces" / "runtime.jsonl").exists()


@pytest.mark.parametrize("command", ["export", "inspect", "train", "demo-db"])
@pytest.mark.parametrize("url, problem", [
    ("postgresql://u:s3cretpw@host:notaport/db", "has port 'notaport', which is not a port number"),
    ("postgresql://u:s3cretpw@host:70000/db", "has port '70000', which is not a port number"),
    ("postgresql://u:s3cretpw@[::1/db", "cannot be read: end of string reached"),
])
def test_invalid_url_is_a_usage_error_before_any_connection(cli, command, url, problem):
    result = cli(command, "--database-url", url)
    assert result.code == 1, result.stderr
    assert problem in result.stderr and "Fix: Write it as postgresql://user:password@host:5432/database" in \
        " ".join(result.stderr.split())
    assert "s3cretpw" not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_database_without_atlas_schema(cli, empty_db):
    result = cli("export", "--database-url", empty_db)
    assert result.code == 4
    assert "does not hold the Atlas schema" in result.stderr and "demo-db" in result.stderr


def test_bad_profile_key_exit_1(cli, seeded_db):
    result = cli("export", "--database-url", seeded_db, "trainer.min_rewrd=0.9")
    assert result.code == 1
    assert "unknown key `trainer.min_rewrd`" in result.stderr and "trainer.min_reward" in result.stderr


def test_conflicting_flags(cli, seeded_db):
    assert cli("export", "--database-url", seeded_db, "--json", "--output", "-").code == 1
    assert cli("export", "--database-url", seeded_db, "--all-statuses", "--include-status", "pending").code == 1


@pytest.fixture(scope="module")
def password_server(scram_server):
    """The scram cluster's socket directory, holding a database `atlas` owned by role atlas (a password)."""
    from psycopg.conninfo import conninfo_to_dict

    with connect(scram_server, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS atlas WITH (FORCE)")
        conn.execute("DROP ROLE IF EXISTS atlas")
        conn.execute("CREATE ROLE atlas LOGIN PASSWORD 'Corr3ct-Horse-Battery'")
        conn.execute("CREATE DATABASE atlas OWNER atlas")
    yield conninfo_to_dict(scram_server)["host"]


def test_wrong_password_exit_4_and_never_printed(cli, password_server, tmp_path):
    url = f"postgresql://atlas:Wr0ng-Passw0rd-42@/atlas?host={password_server}"
    result = cli("export", "--database-url", url, "--json")
    assert result.code == 4, result.stderr
    assert "password authentication failed" in result.stderr
    assert "Check the user and password" in result.stderr
    assert "Wr0ng-Passw0rd-42" not in result.stdout + result.stderr
    via_env = cli("export", "--database-url", f"postgresql://atlas@/atlas?host={password_server}",
                  env={"PGPASSWORD": "Wr0ng-Passw0rd-42"})
    assert via_env.code == 4 and "Wr0ng-Passw0rd-42" not in via_env.stdout + via_env.stderr


def test_right_password_works_and_is_masked(cli, password_server, tmp_path):
    url = f"postgresql://atlas:Corr3ct-Horse-Battery@/atlas?host={password_server}"
    seeded = cli("demo-db", "--database-url", url, "--sessions", "20", "--json")
    assert seeded.code == 0, seeded.stderr
    result = cli("export", "--database-url", url, "--min-reward", "0", "--all-statuses")
    assert result.code == 0, result.stderr
    assert "Corr3ct-Horse-Battery" not in seeded.stdout + seeded.stderr + result.stdout + result.stderr
    assert "***" in result.stdout


def test_demo_db_refuses_a_store_with_sessions(cli, seeded_db):
    result = cli("demo-db", "--database-url", seeded_db, "--sessions", "5")
    assert result.code == 1 and "already holds 300 sessions" in result.stderr and "--append" in result.stderr
    assert len(db_ids(seeded_db)) == 300


def test_interrupted_export_leaves_no_partial_file(seeded_db, tmp_path):
    """SIGINT while the export is under way: the temporary file is removed, nothing else is written."""
    import os
    import signal
    import sys
    import time

    cli_path = os.path.join(os.path.dirname(sys.executable), "atlas-distill")
    with connect(seeded_db) as blocker, connect(seeded_db, autocommit=True) as watcher:
        # Hold the export inside its streaming query, after it has opened its temporary file.
        blocker.execute("LOCK TABLE trajectory_events IN ACCESS EXCLUSIVE MODE")
        # SIGINT as at a terminal: a suite started in the background (`(make test &)` in a script) hands its
        # children SIGINT ignored, and the export then rightly ignores it (what hung this test twice).
        # faulthandler: should the export hang all the same, SIGABRT below prints where.
        proc = subprocess.Popen([cli_path, "export", "--database-url", seeded_db, "--output", "big.jsonl"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".big.jsonl.*.partial")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob(".big.jsonl.*.partial")), "the export never started writing"
        # SIGINT only once the server runs the export's query (waiting for the lock): a cancel request that reaches
        # the server before the query does is dropped, and the query would then wait for the lock for good.
        while time.monotonic() < deadline and not watcher.execute(  # autocommit: a fresh snapshot each time
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid() "
                "AND datname = current_database()").fetchone()[0]:
            time.sleep(0.05)
        assert time.monotonic() < deadline, "the export's query never reached the server"
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            pytest.fail(f"the export did not stop within 60 s of SIGINT; its stacks:\n{proc.communicate()[1]}")
        blocker.rollback()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_closed_stdout_pipe_ends_quietly(seeded_db, tmp_path):
    import os
    import sys

    cli_path = os.path.join(os.path.dirname(sys.executable), "atlas-distill")
    script = f"'{cli_path}' export --database-url \"$URL\" --all-statuses --output - | head -c 10 >/dev/null; " \
             "echo \"rc=${PIPESTATUS[0]}\""
    done = subprocess.run(["bash", "-c", script], env=os.environ | {"URL": seeded_db}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "rc=0", done.stderr
    assert "Error" not in done.stderr and "Traceback" not in done.stderr


def test_demo_db_append_adds_sessions_after_the_ones_there(cli, empty_db):
    first = cli("demo-db", "--database-url", empty_db, "--sessions", "12", "--seed", "3", "--json")
    assert first.code == 0, first.stderr
    before = db_ids(empty_db)
    assert len(before) == 12
    more = cli("demo-db", "--database-url", empty_db, "--sessions", "8", "--seed", "4", "--append", "--json")
    assert more.code == 0, more.stderr
    after = db_ids(empty_db)
    assert len(after) == 20 and set(before) < set(after)  # the first twelve are kept, eight are new


def run_with_stderr_on_a_terminal(args: list[str], cwd) -> tuple[int, str]:
    """The console script with stderr on a pseudo-terminal (stdout still a pipe); returns its exit code and all
    it drew on the terminal."""
    import os
    import pty

    from conftest import CLI

    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("ATLAS_DB_URL", "PGPASSWORD")}
    proc = subprocess.Popen([str(CLI), *args], cwd=cwd, env={**env, "TERM": "xterm-256color"},
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    return proc.wait(timeout=120), drawn.decode("utf-8", "replace")


def test_progress_is_drawn_only_when_stderr_is_a_terminal(cli, seeded_db, tmp_path):
    args = ["export", "--database-url", seeded_db, "--all-statuses", "--min-reward", "0", "--output", "out.jsonl"]
    code, drawn = run_with_stderr_on_a_terminal(args, tmp_path)
    assert code == 0, drawn
    assert "Exporting" in drawn and "\x1b[" in drawn  # the bar, drawn and then cleared
    piped = cli(*args)
    assert piped.code == 0, piped.stderr
    assert "Exporting" not in piped.stderr and "\x1b[" not in piped.stderr  # no bar, no cursor movement
