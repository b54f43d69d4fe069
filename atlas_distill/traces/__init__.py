"""Atlas traces: the session record, Postgres and JSONL sources, the JSONL sink, filters."""

from .filters import FunnelStage, TraceFilter
from .jsonl import JsonlTraceSink, JsonlTraceSource
from .postgres import PostgresTraceSource
from .record import AtlasSession, RecordError

__all__ = ["AtlasSession", "FunnelStage", "JsonlTraceSink", "JsonlTraceSource", "PostgresTraceSource",
           "RecordError", "TraceFilter"]
