"""Export benchmark: our one-query streaming export against the upstream access pattern and COPY.

Seeds a fresh database with N synthetic Atlas sessions (~4.5 steps, ~20 events each), runs ANALYZE
(as autovacuum would) and reads every table once, then times, each writing a temp file:
  (a) ours: export_traces, no filters (one query, streamed in chunks), in a fresh subprocess so its
      peak RSS (VmHWM) is its own: on all N sessions and with limit=--small; a subprocess that
      only imports the library gives the interpreter floor;
  (b) upstream: the Atlas SDK exporter's pattern (atlas/export/jsonl.py, storage/database.py): pages
      of ORDER BY created_at DESC LIMIT 100 OFFSET k, then per session fetch_session (row + plan),
      fetch_session_steps (steps, attempts, guidance notes), fetch_trajectory_events: 6 queries per
      session, shaped by our session_payload so only the access pattern differs;
  (c) COPY (<our query, no filter>) TO STDOUT: the physical limit.
(a) and (b) must hold the same session ids, else exit 1.

    python benchmarks/export_bench.py [--sessions 20000] [--small 1000] [--database-url URL] [--json]

Server: --database-url, else $ATLAS_DB_URL, else an embedded PostgreSQL (pgserver) in a temp dir.
A database atlas_bench_<random> is created on it and dropped at the end, even on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from atlas_distill.db import connect, embedded_postgres, with_database
from atlas_distill.traces.postgres import _COLUMNS, _QUERY, session_payload

from _common import log, peak_rss_mb  # benchmarks/ is sys.path[0] when a script runs

SESSION_COLUMNS = _COLUMNS.replace("{{}}", "{}")  # _COLUMNS is written for a later str.format
ALL_ROWS = _QUERY.format(where="true", limit="")
LABELS = {"ours": "(a) ours: export_traces, one query", "upstream": "(b) upstream: OFFSET pages, 6 queries/session",
          "copy": "(c) COPY (same query) TO STDOUT"}


def worker(mode: str, url: str, limit: int, output: str) -> None:
    """Child process: one export of ours (or only the imports) and its peak RSS, as JSON on stdout."""
    import psycopg  # noqa: F401  (export_traces imports it lazily; the floor should include it)
    from atlas_distill.export import export_traces
    from atlas_distill.traces import TraceFilter

    figures = {}
    if mode == "ours":
        result = export_traces(url, TraceFilter(min_reward=None, review_status=None, limit=limit or None), output)
        figures = {"sessions": result.exported, "seconds": result.seconds, "bytes": result.bytes}
    print(json.dumps({**figures, "rss_mb": peak_rss_mb()}))


def run_worker(mode: str, url: str, output: Path, limit: int = 0) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--database-url", url, "--output", str(output),
               "--limit", str(limit)]
    return json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout)


def fetch_session_steps(conn, sid: int) -> list[dict]:
    """Upstream Database.fetch_session_steps: three queries, joined in Python."""
    steps = conn.execute("SELECT step_id, trace, output, evaluation, attempts, metadata FROM step_results"
                         " WHERE session_id = %s ORDER BY step_id", (sid,)).fetchall()
    attempts: dict[int, list] = {}
    for step_id, attempt, evaluation in conn.execute(
            "SELECT step_id, attempt, evaluation FROM step_attempts WHERE session_id = %s"
            " ORDER BY step_id, attempt", (sid,)):
        attempts.setdefault(step_id, []).append({"attempt": attempt, "evaluation": evaluation})
    guidance: dict[int, list] = {}
    for step_id, _sequence, note in conn.execute(
            "SELECT step_id, sequence, note FROM guidance_notes WHERE session_id = %s"
            " ORDER BY step_id, sequence", (sid,)):
        guidance.setdefault(step_id, []).append(note)
    return [{"step_id": s, "trace": t, "output": o, "evaluation": e, "attempts": a, "metadata": m,
             "attempt_details": attempts.get(s), "guidance": guidance.get(s)} for s, t, o, e, a, m in steps]


def upstream(url: str, output: Path) -> dict:
    started, count, offset = time.perf_counter(), 0, 0
    with connect(url, autocommit=True) as conn, open(output, "w", encoding="utf-8") as handle:
        conn.prepare_threshold = None  # upstream's asyncpg pool runs with its statement cache off
        while page := conn.execute(f"SELECT {SESSION_COLUMNS} FROM sessions s ORDER BY s.created_at DESC"
                                   " LIMIT 100 OFFSET %s", (offset,)).fetchall():
            for row in page:
                sid = row[0]
                # fetch_session: the page rows carry no plan, so upstream reads the session again with it
                session = conn.execute(f"SELECT {SESSION_COLUMNS} FROM sessions s WHERE s.id = %s", (sid,)).fetchone()
                plan = conn.execute("SELECT plan FROM plans WHERE session_id = %s", (sid,)).fetchone()
                steps = fetch_session_steps(conn, sid)
                events = conn.execute("SELECT id, event, to_json(created_at) #>> '{}' FROM trajectory_events"
                                      " WHERE session_id = %s ORDER BY id DESC LIMIT 1000", (sid,)).fetchall()
                events = [{"id": i, "event": e, "created_at": c} for i, e, c in reversed(events)] or None
                payload = session_payload((*session, plan[0] if plan else None, steps or None, events))
                handle.write(json.dumps(payload, ensure_ascii=False) + "\n")
                count += 1
                if count % 5000 == 0:
                    log(f"  upstream: {count} sessions")
            offset += len(page)
    return {"sessions": count, "seconds": time.perf_counter() - started, "bytes": output.stat().st_size}


def copy_out(url: str, output: Path) -> dict:
    started = time.perf_counter()
    with connect(url) as conn, conn.cursor() as cur, open(output, "wb") as handle:
        cur.execute("SET jit = off")  # as ours does, so only the transfer differs
        with cur.copy(f"COPY ({ALL_ROWS}) TO STDOUT") as copy:
            for block in copy:
                handle.write(block)
    seconds = time.perf_counter() - started
    with open(output, "rb") as handle:  # one row per line: text COPY escapes newlines inside values
        rows = sum(1 for _ in handle)
    return {"sessions": rows, "seconds": seconds, "bytes": output.stat().st_size}


def line_digests(path: Path) -> dict:
    """session id -> digest of the line's value (ours is compact JSON, upstream's has spaces)."""
    digests = {}
    with open(path, "rb") as handle:
        for line in handle:
            value = json.loads(line)
            canonical = json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
            digests[value["session_metadata"]["session_id"]] = hashlib.sha1(canonical).digest()
    return digests


def bench(args: argparse.Namespace, url: str, tmp: Path) -> tuple[dict, bool]:
    from atlas_distill.traces.seed import seed_database
    log(f"seeding {args.sessions} sessions ...")
    started = time.perf_counter()
    seeded = seed_database(url, args.sessions,
                           progress=lambda n, total: n % 5000 == 0 and n < total and log(f"  seeded {n}"))
    seed_seconds = time.perf_counter() - started
    with connect(url, autocommit=True) as conn:  # ANALYZE, then warm the caches for every method alike
        conn.execute("ANALYZE")
        for table in ("sessions", "plans", "step_results", "step_attempts", "guidance_notes", "trajectory_events"):
            conn.execute(f"SELECT sum(length(t::text)) FROM {table} t").fetchone()
    log(f"seeded {seeded.sessions} sessions, {seeded.steps} steps, {seeded.events} events in {seed_seconds:.1f}s")
    log("import floor, then (a) ours at --small and at all sessions, (b) upstream, (c) COPY ...")
    floor = run_worker("baseline", url, tmp / "none.jsonl")
    small = run_worker("ours", url, tmp / "small.jsonl", args.small)
    ours = run_worker("ours", url, tmp / "ours.jsonl")
    up = upstream(url, tmp / "upstream.jsonl")
    copy = copy_out(url, tmp / "copy.tsv")
    a, b = line_digests(tmp / "ours.jsonl"), line_digests(tmp / "upstream.jsonl")
    same_ids = ours["sessions"] == up["sessions"] == len(a) == len(b) and a.keys() == b.keys()
    rate = {name: m["sessions"] / m["seconds"] for name, m in (("ours", ours), ("upstream", up), ("copy", copy))}
    report = {
        "seeded": {"sessions": seeded.sessions, "steps": seeded.steps, "events": seeded.events,
                   "seconds": seed_seconds},
        "methods": {"ours": ours, "upstream": up, "copy": copy},
        "sessions_per_second": rate,
        "ratio_ours_over_upstream": rate["ours"] / rate["upstream"],
        "ratio_copy_over_ours": rate["copy"] / rate["ours"],
        "rss_mb": {"import_floor": floor["rss_mb"], "small": small["rss_mb"], "all": ours["rss_mb"],
                   "small_sessions": small["sessions"], "all_sessions": ours["sessions"]},
        "rss_ratio_all_over_small": ours["rss_mb"] / small["rss_mb"],
        "check": {"ours_lines": len(a), "upstream_lines": len(b), "same_session_ids": same_ids,
                  "identical_lines": sum(b.get(sid) == digest for sid, digest in a.items())},
    }
    report["targets"] = {"ours >= 10x upstream": report["ratio_ours_over_upstream"] >= 10,
                         "ours within 3x of COPY": report["ratio_copy_over_ours"] <= 3,
                         "peak RSS < 300 MB": ours["rss_mb"] < 300,
                         "RSS flat in N (all/small <= 1.10)": report["rss_ratio_all_over_small"] <= 1.10}
    return report, same_ids


def print_table(r: dict) -> None:
    s = r["seeded"]
    print(f"seeded {s['sessions']} sessions ({s['steps']} steps, {s['events']} events) in {s['seconds']:.1f} s")
    print(f"{'method':<46}{'sessions':>9}{'seconds':>9}{'sessions/s':>12}{'MB written':>12}")
    for name, m in r["methods"].items():
        print(f"{LABELS[name]:<46}{m['sessions']:>9}{m['seconds']:>9.2f}{r['sessions_per_second'][name]:>12.0f}"
              f"{m['bytes'] / 1e6:>12.1f}")
    print(f"ratio ours/upstream: {r['ratio_ours_over_upstream']:.1f}x   "
          f"ratio copy/ours: {r['ratio_copy_over_ours']:.2f}x")
    m = r["rss_mb"]
    print(f"peak RSS: import floor {m['import_floor']:.1f} MB, ours at {m['small_sessions']} sessions "
          f"{m['small']:.1f} MB, at {m['all_sessions']} sessions {m['all']:.1f} MB "
          f"(ratio {r['rss_ratio_all_over_small']:.2f})")
    c = r["check"]
    print(f"check (a) vs (b): {c['ours_lines']} / {c['upstream_lines']} lines, same session ids: "
          f"{'yes' if c['same_session_ids'] else 'NO'}, identical values: {c['identical_lines']}")
    for target, met in r["targets"].items():
        print(f"target {target}: {'met' if met else 'MISSED'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=20000)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--database-url")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.database_url, args.limit, args.output)
        return 0
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="atlas_bench_")))
        server = args.database_url or os.environ.get("ATLAS_DB_URL")
        if not server:
            log("no --database-url or ATLAS_DB_URL: starting an embedded PostgreSQL")
            server = stack.enter_context(embedded_postgres(tmp / "pgdata"))
        dbname = f"atlas_bench_{uuid.uuid4().hex[:10]}"
        with connect(server, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {dbname}")
        stack.callback(drop_database, server, dbname)  # runs before the embedded server stops
        report, ok = bench(args, with_database(server, dbname), tmp)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    if not ok:
        log("FAILED: (a) and (b) differ in line count or session ids")
    return 0 if ok else 1


def drop_database(server: str, dbname: str) -> None:
    with connect(server, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
    log(f"dropped database {dbname}")


if __name__ == "__main__":
    sys.exit(main())
