"""`make demo` runs scripts/demo.py: seed, export, inspect on an embedded server (the training half,
minutes of CPU, is checked by `make demo-check`; `compare --before`, which ends it, by test_compare)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"


def test_demo_runs_end_to_end_without_a_database_url(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("ATLAS_DB_URL", "ATLAS_TEST_DB_URL")}
    done = subprocess.run([sys.executable, str(DEMO), "--traces-only"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "embedded PostgreSQL" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "demo-output" / "runtime.jsonl").read_text().splitlines()]
    assert len(rows) > 100
    assert all(r["review_status"] == "approved" and r["reward_stats"]["score"] >= 0.8 for r in rows)
    assert (tmp_path / "demo-output" / "inspect.png").stat().st_size > 10_000
    # the store held the demo task's sessions: the export is exactly what `train --profile demo` selects from
    # the bundled traces (the demo then trains on that export)
    from atlas_distill.config import load_profile
    from atlas_distill.demo import DEMO_TRACES
    from atlas_distill.traces import JsonlTraceSource, TraceFilter

    bundled = JsonlTraceSource(DEMO_TRACES, TraceFilter.from_profile(load_profile("demo")))
    assert [(r["task"], r["final_answer"], r["steps"]) for r in rows] == [
        (s.data["task"], s.data["final_answer"], s.data["steps"]) for s in bundled]
