"""Which sessions to keep: one filter, applied in SQL for Postgres and in Python for files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ..config import Profile
    from .record import AtlasSession


def _sql_number(path: str) -> str:
    """A JSON value as float8 when it is a number, else NULL: a malformed score never breaks the query."""
    return f"CASE WHEN jsonb_typeof({path}) = 'number' THEN ({path})::text::float8 END"


# The reward as AtlasSession.reward_source reads it, field by field in REWARD_FIELDS order, as the export writes
# the columns: reward_stats and reward (session_reward) at the top, the metadata column as session_metadata, and
# reward_summary lifted from it. No numeric score anywhere: NULL, which never passes.
_REWARD = "COALESCE(" + ", ".join(_sql_number(f"{column}->'score'") for column in (
    "s.reward_stats", "s.metadata->'reward_stats'", "s.reward", "s.metadata->'session_reward'",
    "s.metadata->'reward_summary'")) + ")"
_REWARD_SQL = f"{_REWARD} >= %(min_reward)s"


@dataclass(frozen=True)
class FunnelStage:
    """How many sessions remain after a filter (`total` first)."""

    label: str
    remaining: int


def describe_funnel(funnel: list[FunnelStage]) -> str:
    """`sessions in database: 12 -> reward >= 0.8: 0 (the filter `reward >= 0.8` left none)`."""
    parts = [f"{stage.label}: {stage.remaining}" for stage in funnel]
    emptied = next((stage.label for stage in funnel if stage.remaining == 0), None)
    text = " -> ".join(parts)
    return f"{text} (the filter `{emptied}` left none)" if emptied and emptied != funnel[0].label else text


def no_match_fix(traces: str | None) -> str:
    """What to try when the filters leave nothing: flags and keys that export, train, chain and compare all take."""
    source = (f"Check that {traces} holds the sessions you meant" if traces else
              "Confirm the database URL (--database-url or ATLAS_DB_URL) points at the right cluster")
    return (f"{source}, lower --min-reward (e.g. --min-reward 0.5), drop the task filter "
            "(trainer.learning_key=null), or widen the review filter (--include-status pending, or --all-statuses).")


class Stage(NamedTuple):
    """One active filter: its funnel label, its SQL condition and parameters, and the same test in Python."""

    label: str
    sql: str
    params: dict[str, Any]
    keeps: Callable[[AtlasSession], bool]


@dataclass(frozen=True)
class TraceFilter:
    min_reward: float | None = None
    learning_key: str | None = None
    review_status: tuple[str, ...] | None = ("approved",)
    status: tuple[str, ...] | None = None
    created_after: datetime | None = None
    session_ids: tuple[int, ...] | None = None
    limit: int | None = None

    @classmethod
    def from_profile(cls, profile: Profile) -> TraceFilter:
        data, trainer = profile.data, profile.trainer
        return cls(
            min_reward=trainer.min_reward,
            learning_key=trainer.learning_key,
            review_status=tuple(data.review_status) if data.review_status is not None else None,
            status=tuple(data.status) if data.status is not None else None,
            created_after=data.created_after,
            session_ids=tuple(data.session_ids) if data.session_ids is not None else None,
            limit=data.limit,
        )

    def stages(self) -> list[Stage]:
        """The active filters in funnel order."""
        stages: list[Stage] = []
        if (review := self.review_status) is not None:
            stages.append(Stage(f"review_status in {list(review)}", "s.review_status = ANY(%(review_status)s)",
                                {"review_status": list(review)}, lambda s: s.review_status in review))
        if (status := self.status) is not None:
            stages.append(Stage(f"status in {list(status)}", "s.status = ANY(%(status)s)", {"status": list(status)},
                                lambda s: s.status in status))
        if (key := self.learning_key) is not None:
            stages.append(Stage(f"learning_key = {key!r}", "s.metadata->>'learning_key' = %(learning_key)s",
                                {"learning_key": key}, lambda s: s.learning_key == key))
        if (floor := self.min_reward) is not None:
            stages.append(Stage(f"reward >= {floor:g}", _REWARD_SQL, {"min_reward": floor},
                                lambda s: s.reward is not None and s.reward >= floor))
        if self.created_after is not None:
            after = self._aware(self.created_after)
            stages.append(Stage(f"created after {self.created_after.isoformat()}", "s.created_at > %(created_after)s",
                                {"created_after": after}, lambda s: _created_after(s, after)))
        if (ids := self.session_ids) is not None:
            stages.append(Stage(f"session id in {len(ids)} given", "s.id = ANY(%(session_ids)s)",
                                {"session_ids": list(ids)}, lambda s: s.session_id in ids))
        return stages

    @staticmethod
    def _aware(moment: datetime) -> datetime:
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)

    def matches(self, session: AtlasSession) -> bool:
        """The same filter, for sessions read from a file (limit is applied by the reader)."""
        return all(stage.keeps(session) for stage in self.stages())


def _created_after(session: AtlasSession, after: datetime) -> bool:
    created = _parse_time(session.metadata.get("created_at"))
    return created is not None and created > after


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
