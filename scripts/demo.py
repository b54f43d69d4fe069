"""`make demo`: the product's own pipeline on builtin data and models, through the real CLI.

1. Traces: `demo-db` fills a demo Atlas store with the demo task's sessions (the
   generator and seed of the bundled traces), `export --profile demo` writes the
   approved high-reward ones to JSONL, and `inspect` shows them. Uses the server in
   $ATLAS_DB_URL when set (in a separate `atlas_distill_demo` database, never the
   store's own), else an embedded PostgreSQL (pgserver), stopped afterwards.
2. Training: `train --profile demo --traces` that very export (GKD from a specialised
   SmolLM2-135M teacher into a depth-pruned student), then `compare --before`: the
   teacher, the student before and the student after, as a table and a PNG.
   `--traces-only` skips this part.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import warnings
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

from atlas_distill.db import connect, embedded_postgres, mask_url, with_database
from atlas_distill.demo import DEMO_SEED, DEMO_SESSIONS

# pgserver asks platformdirs for a runtime directory; without XDG_RUNTIME_DIR it warns and uses /tmp, which is fine
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

DEMO_DB = "atlas_distill_demo"
OUT = Path("demo-output")
CLI = str(Path(sys.executable).with_name("atlas-distill"))


def run(*args: str) -> None:
    shown = [mask_url(a) for a in args]
    print(f"\n$ atlas-distill {shlex.join(shown)}", flush=True)
    subprocess.run([CLI, *args], check=True)


def fresh_database(server_url: str) -> str:
    with connect(server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DEMO_DB}")
        conn.execute(f"CREATE DATABASE {DEMO_DB}")
    return with_database(server_url, DEMO_DB)


def main() -> int:
    OUT.mkdir(exist_ok=True)
    traces_only = "--traces-only" in sys.argv[1:]
    with ExitStack() as stack:
        server = os.environ.get("ATLAS_DB_URL")
        if server:
            print(f"Using the PostgreSQL server of ATLAS_DB_URL ({mask_url(server)}), database {DEMO_DB}")
        else:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="atlas-demo-pg-")))
            server = stack.enter_context(embedded_postgres(data_dir / "pgdata"))
            print("No ATLAS_DB_URL: started an embedded PostgreSQL (pgserver); it stops when the demo ends")
        url = fresh_database(server)
        try:
            run("demo-db", "--database-url", url, "--sessions", str(DEMO_SESSIONS), "--seed", str(DEMO_SEED))
            run("export", "--database-url", url, "--profile", "demo", "--output", str(OUT / "runtime.jsonl"))
            run("inspect", str(OUT / "runtime.jsonl"), "--plot", str(OUT / "inspect.png"))
        except subprocess.CalledProcessError as exc:
            print(f"demo step failed with exit code {exc.returncode}", file=sys.stderr)
            return exc.returncode
    if traces_only:
        print(f"\nDone: {OUT / 'runtime.jsonl'} and {OUT / 'inspect.png'}.")
        return 0
    name = f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        run("train", "--profile", "demo", "--traces", str(OUT / "runtime.jsonl"), "--output-dir", str(OUT / "gkd"),
            "--run-name", name)
        run("compare", str(OUT / "gkd" / name), "--before", "--profile", "demo", "--plot", str(OUT / "compare.png"))
    except subprocess.CalledProcessError as exc:
        print(f"demo training failed with exit code {exc.returncode}", file=sys.stderr)
        return exc.returncode
    print(f"\nDone: traces in {OUT / 'runtime.jsonl'} ({OUT / 'inspect.png'}); the run (final/ student, "
          f"summary.json, metrics.jsonl) in {OUT / 'gkd' / name}; the comparison in {OUT / 'compare.png'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
