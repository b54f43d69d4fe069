"""Atlas traces: the session record, Postgres and JSONL sources, the JSONL sink, filters."""

from .filters import TraceFilter
from .jsonl import JsonlTraceSink, JsonlTraceSource
from .postgres import FunnelStage, PostgresTraceSource
from .record import AtlasSession, RecordError

__all__ = ["AtlasSession", "FunnelStage", "JsonlTraceSink", "JsonlTraceSource", "PostgresTraceSource",
           "RecordError", "TraceFilter"]
