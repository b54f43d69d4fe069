"""The offline demo: bundled CRM traces and a teacher specialised on them (see teacher.py)."""

from pathlib import Path

DEMO_TRACES = Path(__file__).parent / "crm_traces.jsonl.gz"
# The bundled traces are the synthetic generator's first DEMO_SESSIONS sessions from DEMO_SEED: `demo-db --sessions
# 1600 --seed 2026` fills a store with the same sessions (scripts/make_demo_traces.py regenerates the file).
DEMO_SESSIONS = 1600
DEMO_SEED = 2026
