"""Regenerate the bundled demo traces: atlas_distill/demo/crm_traces.jsonl.gz.

Synthetic CRM sessions (the same generator as `atlas-distill demo-db`), in the
arc-atlas export format. The task is checkable: the final answer is one JSON
tool call whose arguments come from the note in the task.

    .venv/bin/python scripts/make_demo_traces.py [--sessions 1600] [--seed 2026]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from atlas_distill.demo import DEMO_SEED, DEMO_SESSIONS
from atlas_distill.traces import AtlasSession, JsonlTraceSink
from atlas_distill.traces.synthetic import generate_sessions, to_record

TARGET = Path(__file__).resolve().parents[1] / "atlas_distill" / "demo" / "crm_traces.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=DEMO_SESSIONS)
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    args = parser.parse_args()
    sink = JsonlTraceSink(TARGET)
    for session_id, session in enumerate(generate_sessions(args.sessions, seed=args.seed), start=1):
        sink.write(AtlasSession(to_record(session, session_id)))
    sink.commit()
    print(f"wrote {args.sessions} sessions to {TARGET} ({TARGET.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
