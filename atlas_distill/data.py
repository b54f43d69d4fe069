"""Atlas sessions -> GKD train/eval datasets of chat conversations (DESIGN §3).

Each row: `messages` (system, the exchange, and the final answer as the last
assistant turn), plus `session_id`, `learning_key`, `reward` and `reference` (the
final answer, for evaluation). With `targets="all"` (the default) a row also has
`targets`: the indices of the assistant turns the student learns (every action and
the final answer); with `targets="final"` the row is as it always was, the last
turn its only target. The split is a hash of the session id, so a growing
database never moves an eval session into training. Conversations longer than
`max_length` tokens are cut from the left by the collator (whole turns) and
counted here; a target turn that alone does not fit is dropped and counted (a
row left without its final answer is dropped), never silently.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import NoTracesFound, UsageError
from .traces import AtlasSession, JsonlTraceSource, PostgresTraceSource, TraceFilter
from .traces.conversation import session_to_conversation, session_to_messages, system_prompt
from .traces.filters import describe_funnel, no_match_fix

if TYPE_CHECKING:
    from .config import Profile

_SPLIT_SCALE = float(2**64)


@dataclass
class DatasetStats:
    source: str
    sessions: int = 0
    train: int = 0
    eval: int = 0
    truncated: int = 0
    dropped_no_answer: int = 0
    dropped_too_long: int = 0
    targets: int = 0
    """Target turns in the kept rows (train and eval)."""
    dropped_targets: int = 0
    """Target turns (not final answers) too long to fit max_length alone, left out of their rows."""
    funnel: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreparedData:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    stats: DatasetStats

    def eval_sample(self, limit: int | None) -> list[dict[str, Any]]:
        """The eval conversations generated on: the first `limit` of the split (all when None)."""
        return self.eval[:limit] if limit else self.eval


def split_of(session: AtlasSession, eval_split: float) -> str:
    """'eval' or 'train', fixed per session: a hash of its id (or of its content when it has none)."""
    key = str(session.session_id) if session.session_id is not None else session.task + session.final_answer
    fraction = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / _SPLIT_SCALE
    return "eval" if fraction < eval_split else "train"


def session_messages(session: AtlasSession, prompt: str = "conversation") -> list[dict[str, str]]:
    if prompt == "task":
        return [{"role": "system", "content": system_prompt(session)},
                {"role": "user", "content": session.task.strip()},
                {"role": "assistant", "content": session.final_answer.strip()}]
    return session_to_messages(session)


TARGETS = ("all", "final")


def conversation_row(session: AtlasSession, prompt: str = "conversation", targets: str = "all") -> dict[str, Any]:
    """The training row of a session; `targets="all"` (with the conversation prompt) adds `targets`."""
    if targets not in TARGETS:
        raise UsageError(f"Unknown targets `{targets}`.", fix="Use data.targets=all or data.targets=final.")
    if targets == "all" and prompt == "conversation":
        conversation = session_to_conversation(session)
        row: dict[str, Any] = {"messages": conversation.messages, "targets": conversation.targets}
    else:
        row = {"messages": session_messages(session, prompt)}
    return row | {"session_id": str(session.session_id), "learning_key": session.learning_key,
                  "reward": session.reward, "reference": session.final_answer.strip()}


def _fit_targets(tokenizer, row: dict[str, Any], max_length: int) -> tuple[int, int, bool]:
    """(full tokens, targets dropped, whether the final answer alone does not fit) for an `all` row, whose
    `targets` lose the turns that alone are max_length tokens or more."""
    from .target_spans import chat_messages, encode, supports_tool_role

    messages, targets = chat_messages(row["messages"], row["targets"], tool_role=supports_tool_role(tokenizer))
    encoded = encode(tokenizer, messages, targets)
    fits = [end - start < max_length for start, end in encoded.spans]
    row["targets"] = [t for t, ok in zip(row["targets"], fits) if ok]
    return len(encoded.ids), fits.count(False) - (not fits[-1]), not fits[-1]


def _token_lengths(tokenizer, messages: list[dict[str, str]]) -> tuple[int, int]:
    """(prompt tokens, full conversation tokens) as the chat template renders them."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    encode = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return encode(prompt), encode(full)


def prepare_conversations(sessions: Iterable[AtlasSession], *, source: str, eval_split: float = 0.15,
                          prompt: str = "conversation", tokenizer=None, max_length: int | None = None,
                          seed: int = 42, progress: Callable[[int], None] | None = None,
                          targets: str = "all") -> PreparedData:
    stats = DatasetStats(source=source)
    train, evaluation = [], []
    for session in sessions:
        stats.sessions += 1
        if not session.final_answer.strip():
            stats.dropped_no_answer += 1
            continue
        row = conversation_row(session, prompt, targets)
        if tokenizer is not None and max_length is not None:
            if "targets" in row:
                full_tokens, dropped, final_too_long = _fit_targets(tokenizer, row, max_length)
                stats.dropped_targets += dropped
            else:
                prompt_tokens, full_tokens = _token_lengths(tokenizer, row["messages"])
                final_too_long = full_tokens - prompt_tokens >= max_length
            if final_too_long:
                stats.dropped_too_long += 1
                continue
            stats.truncated += full_tokens > max_length
            row["length"] = full_tokens  # what the trainer's length-grouped sampler sorts by
        stats.targets += len(row.get("targets", [None]))
        (evaluation if split_of(session, eval_split) == "eval" else train).append(row)
        if progress and stats.sessions % 200 == 0:
            progress(stats.sessions)
    random.Random(seed).shuffle(train)
    stats.train, stats.eval = len(train), len(evaluation)
    return PreparedData(train, evaluation, stats)


def trace_source(*, db_url: str | None = None, traces: str | None = None, filters: TraceFilter,
                 skip_invalid: bool = False):
    if (db_url is None) == (traces is None):
        raise UsageError("Give exactly one data source: a database URL or a trace file.",
                         fix="Pass --database-url (or set ATLAS_DB_URL) or --traces FILE, not both.")
    if db_url is not None:
        return PostgresTraceSource(db_url, filters)
    return JsonlTraceSource(traces, filters, skip_invalid=skip_invalid)


def load_prepared(*, db_url: str | None = None, traces: str | None = None, filters: TraceFilter,
                  eval_split: float = 0.15, prompt: str = "conversation", tokenizer=None,
                  max_length: int | None = None, seed: int = 42, skip_invalid: bool = False,
                  progress: Callable[[int], None] | None = None, targets: str = "all") -> PreparedData:
    """Read, convert and split; NoTracesFound (with the filter funnel for Postgres) when nothing is left."""
    source = trace_source(db_url=db_url, traces=traces, filters=filters, skip_invalid=skip_invalid)
    prepared = prepare_conversations(source, source="database" if db_url else str(traces), eval_split=eval_split,
                                     prompt=prompt, tokenizer=tokenizer, max_length=max_length, seed=seed,
                                     progress=progress, targets=targets)
    funnel = getattr(source, "funnel", [])
    prepared.stats.funnel = [{"filter": s.label, "remaining": s.remaining} for s in funnel]
    if prepared.stats.train == 0:
        where = describe_funnel(funnel) if funnel else f"{prepared.stats.sessions} sessions"
        origin = "database" if db_url else str(traces)
        raise NoTracesFound(f"No conversations found in {origin}: no training conversation is left ({where}; "
                            f"{prepared.stats.eval} went to evaluation).", fix=no_match_fix(traces))
    return prepared


def prepare_for_profile(profile: Profile, *, db_url: str | None = None, traces: str | None = None, tokenizer=None,
                        skip_invalid: bool = False) -> PreparedData:
    """`train`'s split of the sessions a profile selects; `compare --model` uses it to evaluate alike."""
    t = profile.trainer
    prepared = load_prepared(db_url=db_url, traces=traces, filters=TraceFilter.from_profile(profile),
                             eval_split=profile.data.eval_split, prompt=profile.data.prompt, tokenizer=tokenizer,
                             max_length=t.max_length, seed=t.seed, skip_invalid=skip_invalid,
                             targets=profile.data.targets)
    if not prepared.eval:
        raise NoTracesFound("No conversations left for evaluation after the split.",
                            fix="Raise data.eval_split or widen the filters so that more sessions match.")
    return prepared


def build_gkd_dataset(db_url: str | None = None, *, traces: str | None = None, min_reward: float | None = 0.8,
                      learning_key: str | None = None, eval_split: float = 0.15, limit: int | None = None,
                      seed: int = 42, review_status: tuple[str, ...] | None = ("approved",),
                      prompt: str = "conversation", tokenizer=None, max_length: int | None = None,
                      targets: str = "all"):
    """(train, eval) `datasets.Dataset`s, as upstream's `trainers.gkd_dataset.build_gkd_dataset`.

    targets: "all" (every action of the agent and the final answer are learnt; each row's `targets` lists
    their message indices) or "final" (the final answer only, everything before it prompt)."""
    from datasets import Dataset

    filters = TraceFilter(min_reward=min_reward, learning_key=learning_key, review_status=review_status, limit=limit)
    prepared = load_prepared(db_url=db_url, traces=traces, filters=filters, eval_split=eval_split, prompt=prompt,
                             tokenizer=tokenizer, max_length=max_length, seed=seed, targets=targets)
    return Dataset.from_list(prepared.train), Dataset.from_list(prepared.eval)
