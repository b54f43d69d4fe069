"""Which sessions to keep: one filter, applied in SQL for Postgres and in Python for files."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Profile
    from .record import AtlasSession

# (sql condition, bound parameter) per filter; a numeric score only, so a malformed
# reward_stats never breaks the query, and NULL reward_stats never passes.
_REWARD_SQL = (
    "CASE WHEN jsonb_typeof(s.reward_stats->'score') = 'number' "
    "THEN (s.reward_stats->>'score')::float8 END >= %(min_reward)s"
)


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

    def stages(self) -> list[tuple[str, str, dict[str, Any]]]:
        """The active filters in funnel order: (label, SQL condition, parameters)."""
        stages: list[tuple[str, str, dict[str, Any]]] = []
        if self.review_status is not None:
            stages.append(
                (f"review_status in {list(self.review_status)}", "s.review_status = ANY(%(review_status)s)",
                 {"review_status": list(self.review_status)})
            )
        if self.status is not None:
            stages.append((f"status in {list(self.status)}", "s.status = ANY(%(status)s)",
                           {"status": list(self.status)}))
        if self.learning_key is not None:
            stages.append((f"learning_key = {self.learning_key!r}", "s.metadata->>'learning_key' = %(learning_key)s",
                           {"learning_key": self.learning_key}))
        if self.min_reward is not None:
            stages.append((f"reward >= {self.min_reward:g}", _REWARD_SQL, {"min_reward": self.min_reward}))
        if self.created_after is not None:
            stages.append((f"created after {self.created_after.isoformat()}", "s.created_at > %(created_after)s",
                           {"created_after": self._aware(self.created_after)}))
        if self.session_ids is not None:
            stages.append((f"session id in {len(self.session_ids)} given", "s.id = ANY(%(session_ids)s)",
                           {"session_ids": list(self.session_ids)}))
        return stages

    @staticmethod
    def _aware(moment: datetime) -> datetime:
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)

    def matches(self, session: AtlasSession) -> bool:
        """The same filter, for sessions read from a file (limit is applied by the reader)."""
        if self.review_status is not None and session.review_status not in self.review_status:
            return False
        if self.status is not None and session.status not in self.status:
            return False
        if self.learning_key is not None and session.learning_key != self.learning_key:
            return False
        if self.min_reward is not None and (session.reward is None or session.reward < self.min_reward):
            return False
        if self.created_after is not None:
            created = _parse_time(session.metadata.get("created_at"))
            if created is None or created <= self._aware(self.created_after):
                return False
        if self.session_ids is not None and session.session_id not in self.session_ids:
            return False
        return True


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
