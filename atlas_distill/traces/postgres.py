"""Stream Atlas sessions out of Postgres with ONE query.

Upstream issues one query per session for steps and another for events, paging
sessions with OFFSET. Here steps (with guidance notes and attempts) and
trajectory events are aggregated server-side per session by LATERAL subqueries,
rows are streamed in chunks in id order (keyset: resuming is `id > last id`,
never OFFSET), and everything runs in one READ ONLY REPEATABLE READ transaction
so the funnel counts and the rows agree. A connection lost mid-read is reopened
and the read resumes after the last session (see PostgresTraceSource).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..db import connect, mask_url, query_error, scrub
from ..errors import DatabaseConnectionLost, DatabaseError
from .json_codec import loads
from .filters import FunnelStage, TraceFilter
from .record import AtlasSession

if TYPE_CHECKING:
    import psycopg

_COLUMNS = (
    "s.id, s.task, s.status, s.metadata, s.final_answer, s.reward, s.reward_stats, s.reward_audit, "
    "s.student_learning, s.teacher_learning, s.review_status, s.review_notes, "
    "to_json(s.created_at) #>> '{{}}', to_json(s.completed_at) #>> '{{}}'"
)

_QUERY = f"""
SELECT {_COLUMNS}, p.plan, st.steps, ev.events
FROM sessions s
LEFT JOIN plans p ON p.session_id = s.id
LEFT JOIN LATERAL (
    SELECT json_agg(json_build_object(
        'step_id', r.step_id, 'trace', r.trace, 'output', r.output, 'evaluation', r.evaluation,
        'attempts', r.attempts, 'metadata', r.metadata,
        'guidance', (SELECT json_agg(g.note ORDER BY g.sequence) FROM guidance_notes g
                     WHERE g.session_id = r.session_id AND g.step_id = r.step_id),
        'attempt_details', (SELECT json_agg(json_build_object('attempt', a.attempt, 'evaluation', a.evaluation)
                                            ORDER BY a.attempt)
                            FROM step_attempts a WHERE a.session_id = r.session_id AND a.step_id = r.step_id)
    ) ORDER BY r.step_id) AS steps
    FROM step_results r WHERE r.session_id = s.id
) st ON true
LEFT JOIN LATERAL (
    SELECT json_agg(json_build_object('id', e.id, 'event', e.event, 'created_at', e.created_at)
                    ORDER BY e.id) AS events
    FROM trajectory_events e WHERE e.session_id = s.id
) ev ON true
WHERE {{where}}
ORDER BY s.id
{{limit}}
"""

# Optional arc-atlas keys that the SDK's exporter (atlas/cli/jsonl_writer.py) lifts out of the metadata column,
# where its runtime writes them (atlas/core: _collect_session_insights); execution_mode and drift_alert have
# fallbacks of their own.
_FROM_METADATA = ("adaptive_summary", "triage_dossier", "learning_history", "teacher_notes", "reward_summary",
                  "drift")


@dataclass(frozen=True)
class Reconnect:
    """A lost connection about to be retried: attempt `attempt` of `retries`, after `delay` seconds."""

    attempt: int
    retries: int
    delay: float
    sessions_read: int
    reason: str


class PostgresTraceSource:
    """Sessions matching a filter, streamed from an Atlas Postgres store.

    A connection lost mid-read (server restart, failover, a terminated backend) is
    reconnected up to `retries` times, after `backoff`, 2x, 4x ... seconds, and the read
    resumes after the last session handed out (keyset `id > last id`): none is read twice
    or skipped. The new connection reads a new snapshot, so sessions committed meanwhile
    with higher ids are included, and the funnel is recounted in it. Only a connection
    that was established and then lost is retried; one that cannot be opened at the start
    fails at once.
    """

    def __init__(self, url: str, filters: TraceFilter, *, after_id: int | None = None, fetch_size: int = 250,
                 retries: int = 3, backoff: float = 0.5, application_name: str = "atlas-distill",
                 on_reconnect: Callable[[Reconnect], None] | None = None):
        self.url = url
        self.filters = filters
        self.after_id = after_id
        self.fetch_size = fetch_size
        self.retries = retries
        self.backoff = backoff
        self.application_name = application_name
        self.on_reconnect = on_reconnect
        self.funnel: list[FunnelStage] = []
        self.read = 0
        self.reconnects = 0
        self._last_id = after_id

    def _where(self) -> tuple[str, dict[str, Any]]:
        conditions, params = ["true"], {}
        for stage in self.filters.stages():
            conditions.append(stage.sql)
            params.update(stage.params)
        if self._last_id is not None:
            conditions.append("s.id > %(after_id)s")
            params["after_id"] = self._last_id
        return " AND ".join(conditions), params

    def _count_funnel(self, cur) -> list[FunnelStage]:
        stages = self.filters.stages()
        parts, params, running = ["count(*)"], {}, []
        for stage in stages:
            running.append(stage.sql)
            parts.append(f"count(*) FILTER (WHERE {' AND '.join(running)})")
            params.update(stage.params)
        cur.execute(f"SELECT {', '.join(parts)} FROM sessions s", params)
        counts = cur.fetchone()
        funnel = [FunnelStage("sessions in database", counts[0])]
        funnel += [FunnelStage(stage.label, n) for stage, n in zip(stages, counts[1:], strict=True)]
        if self.filters.limit is not None and self.filters.limit < funnel[-1].remaining:
            funnel.append(FunnelStage(f"limit {self.filters.limit}", self.filters.limit))
        return funnel

    def __iter__(self) -> Iterator[AtlasSession]:
        import psycopg

        self.read, self.reconnects, self._last_id = 0, 0, self.after_id
        failures = 0  # reconnection attempts since a session was last read
        conn = connect(self.url, application_name=self.application_name)
        try:
            while True:
                read_before = self.read
                try:
                    yield from self._stream(conn)
                    return
                except psycopg.Error as exc:
                    if not conn.broken:
                        raise query_error(exc, self.url) from None
                    reason = _first_line(exc, self.url)
                conn.close()
                if self.read > read_before:
                    failures = 0
                conn, failures = self._reconnect(reason, failures)
                self.reconnects += 1
        finally:
            conn.close()

    def _reconnect(self, reason: str, failures: int) -> tuple[psycopg.Connection, int]:
        """A new connection after a loss, waiting longer before each attempt; gives up after `retries`."""
        while failures < self.retries:
            delay = self.backoff * 2 ** failures
            failures += 1
            if self.on_reconnect:
                self.on_reconnect(Reconnect(failures, self.retries, delay, self.read, reason))
            time.sleep(delay)
            try:
                return connect(self.url, application_name=self.application_name), failures
            except DatabaseError as exc:
                reason = exc.message
        tried = (f"{failures} reconnection attempt{'s' if failures > 1 else ''} failed" if failures
                 else "no reconnection was attempted (retries 0)")
        raise DatabaseConnectionLost(
            f"Lost the connection to the database at {mask_url(self.url)} after reading {self.read} sessions, "
            f"and {tried}. Last error: {reason.rstrip('.')}.",
            sessions_read=self.read, attempts=failures, last_error=reason,
            fix="Check that the server is up and reachable, then run it again; more retries wait out a longer "
            "outage.")

    def _stream(self, conn: psycopg.Connection) -> Iterator[AtlasSession]:
        """Sessions after the last one read, in id order, in one READ ONLY REPEATABLE READ transaction."""
        import psycopg
        from psycopg.types.json import set_json_loads

        where, params = self._where()
        limit = ""
        if self.filters.limit is not None:
            if self.read >= self.filters.limit:
                return
            limit, params["limit"] = "LIMIT %(limit)s", self.filters.limit - self.read
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        set_json_loads(loads, conn)
        with conn.transaction(), conn.cursor() as cur:
            # JIT compiling this query costs more than it saves at any export size measured.
            cur.execute("SET LOCAL jit = off")
            self.funnel = self._count_funnel(cur)
            # Streamed in chunks (one query, bounded memory): unlike FETCH on a named cursor,
            # the server keeps producing rows while we encode the previous ones.
            for row in cur.stream(_QUERY.format(where=where, limit=limit), params, size=_chunk(self.fetch_size)):
                session = AtlasSession(session_payload(row))
                self._last_id = row[0]
                self.read += 1
                yield session

    @property
    def expected(self) -> int | None:
        return self.funnel[-1].remaining if self.funnel else None


def _first_line(exc: Exception, url: str) -> str:
    text = str(exc).strip()
    return scrub(text.splitlines()[0] if text else type(exc).__name__, url)


def _chunk(size: int) -> int:
    """Rows per network chunk; libpq before 17 can stream only one row at a time."""
    import psycopg

    return size if psycopg.pq.version() >= 170000 else 1


def session_payload(row: tuple) -> dict[str, Any]:
    """One query row in the arc-atlas export format."""
    (session_id, task, status, metadata, final_answer, reward, reward_stats, reward_audit, student_learning,
     teacher_learning, review_status, review_notes, created_at, completed_at, plan, steps, events) = row
    metadata = metadata if isinstance(metadata, dict) else ({} if metadata is None else {"raw": metadata})
    session_metadata = {"session_id": session_id, "status": status, "created_at": created_at,
                        "completed_at": completed_at, **metadata}
    plan = plan if isinstance(plan, dict) else {}
    plan_steps = {s.get("id"): s for s in plan.get("steps") or [] if isinstance(s, dict)}
    payload: dict[str, Any] = {
        "task": task,
        "final_answer": final_answer or "",
        "plan": plan,
        "steps": _steps_payload(steps or [], plan_steps),
        "session_metadata": session_metadata,
    }
    optional = {
        "review_status": review_status, "review_notes": review_notes, "reward_stats": reward_stats,
        "reward_audit": reward_audit, "session_reward": reward,
        "student_learning": student_learning or metadata.get("student_learning"),
        "teacher_learning": teacher_learning or metadata.get("teacher_learning"),
        "learning_key": metadata.get("learning_key"), "execution_mode": _execution_mode(metadata),
        "drift_alert": _get(metadata, "drift_alert") if metadata.get("drift_alert") is not None
        else _get(metadata.get("drift"), "drift_alert"),
        **{key: metadata.get(key) for key in _FROM_METADATA},
        "trajectory_events": events,
    }
    payload.update((key, value) for key, value in optional.items() if value is not None)
    return payload


def _execution_mode(metadata: dict[str, Any]) -> str | None:
    """As the SDK's exporter: metadata.execution_mode, else the adaptive summary's adaptive_mode."""
    mode = metadata.get("execution_mode")
    if isinstance(mode, str) and mode:
        return mode
    mode = _get(metadata.get("adaptive_summary"), "adaptive_mode")
    return mode if isinstance(mode, str) and mode else None


def _get(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, dict) else None


def _steps_payload(rows: list[dict[str, Any]], plan_steps: dict[Any, dict[str, Any]]) -> list[dict[str, Any]]:
    prior: dict[str, Any] = {}
    steps = []
    for row in rows:
        plan_step = plan_steps.get(row["step_id"], {})
        evaluation = row.get("evaluation") if isinstance(row.get("evaluation"), dict) else {}
        reward = evaluation.get("reward") if isinstance(evaluation.get("reward"), dict) else {}
        metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        if row.get("attempt_details"):
            metadata = {**metadata, "attempt_details": row["attempt_details"]}
        guidance = row.get("guidance") or []
        steps.append({
            "step_id": row["step_id"],
            "description": plan_step.get("description") or "",
            "trace": row.get("trace") or "",
            "output": row.get("output") or "",
            "reward": {"score": _number(reward.get("score")), "judges": reward.get("judges") or [],
                       "rationale": reward.get("rationale"), "raw": reward},
            "tool": plan_step.get("tool"),
            "tool_params": plan_step.get("tool_params") if isinstance(plan_step.get("tool_params"), dict) else {},
            "context": {"prior_results": dict(prior)},
            "validation": evaluation.get("validation") if isinstance(evaluation.get("validation"), dict) else {},
            "attempts": row.get("attempts") if isinstance(row.get("attempts"), int)
            else len(row.get("attempt_details") or []),
            "guidance": [str(note) for note in guidance],
            "metadata": metadata,
        })
        prior[str(row["step_id"])] = row.get("output") or ""
    return steps


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
