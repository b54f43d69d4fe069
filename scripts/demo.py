"""`make demo`: the trace half of the main job, through the real CLI.

Seeds a demo Atlas store with synthetic sessions, exports the approved
high-reward ones to JSONL, and inspects the result. Uses the server in
$ATLAS_DB_URL when set (in a separate `atlas_distill_demo` database, never the
store's own), else starts an embedded PostgreSQL (pgserver) and stops it after.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from atlas_distill.db import connect, embedded_postgres, mask_url, with_database

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
            run("demo-db", "--database-url", url, "--sessions", "2000")
            run("export", "--database-url", url, "--min-reward", "0.8", "--output", str(OUT / "runtime.jsonl"))
            run("inspect", str(OUT / "runtime.jsonl"), "--plot", str(OUT / "inspect.png"))
        except subprocess.CalledProcessError as exc:
            print(f"demo step failed with exit code {exc.returncode}", file=sys.stderr)
            return exc.returncode
    print(f"\nDone: {OUT / 'runtime.jsonl'} and {OUT / 'inspect.png'}. "
          "Training (`atlas-distill train`) arrives with the next release.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
