"""The offline demo: bundled CRM traces and a teacher specialised on them (see teacher.py)."""

from pathlib import Path

DEMO_TRACES = Path(__file__).parent / "crm_traces.jsonl.gz"
