"""Inspect: what a set of sessions holds, before choosing filters for training."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from .traces import AtlasSession
from .traces.conversation import session_to_messages

REWARD_BINS = 10
TURN_EDGES = [1, 3, 5, 9, 17, 33]
TOKEN_EDGES = [0, 256, 512, 1024, 2048, 4096, 8192]
CHARS_PER_TOKEN = 4  # rough, tokenizer-free estimate for English text and JSON


@dataclass
class Bin:
    label: str
    count: int


@dataclass
class InspectReport:
    source: str
    sessions: int = 0
    invalid_skipped: int = 0
    comment_lines: int = 0
    reward: list[Bin] = field(default_factory=list)
    no_reward: int = 0
    reward_fields: list[Bin] = field(default_factory=list)  # which field each session's reward was read from
    learning_keys: list[Bin] = field(default_factory=list)
    status: list[Bin] = field(default_factory=list)
    review_status: list[Bin] = field(default_factory=list)
    turns: list[Bin] = field(default_factory=list)
    approx_tokens: list[Bin] = field(default_factory=list)
    reward_mean: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _edge_bins(values: list[int], edges: list[int]) -> list[Bin]:
    bins = []
    for low, high in zip(edges, edges[1:] + [None]):
        label = f"{low}+" if high is None else (f"{low}" if high - low == 1 else f"{low}-{high - 1}")
        bins.append(Bin(label, sum(1 for v in values if v >= low and (high is None or v < high))))
    return bins


def _counts(counter: Counter, top: int | None = None) -> list[Bin]:
    ranked = counter.most_common()
    if top is None or len(ranked) <= top:
        return [Bin(str(k), n) for k, n in ranked]
    rest = ranked[top:]
    return [Bin(str(k), n) for k, n in ranked[:top]] + [Bin(f"({len(rest)} other keys)", sum(n for _, n in rest))]


def inspect_sessions(sessions: Iterable[AtlasSession], *, source: str, top: int = 10,
                     progress: Callable[[int], None] | None = None) -> InspectReport:
    report = InspectReport(source=source)
    rewards: list[float] = []
    keys, status, review, reward_fields = Counter(), Counter(), Counter(), Counter()
    turns, tokens = [], []
    for session in sessions:
        report.sessions += 1
        reward, reward_field = session.reward_source()
        if reward is None:
            report.no_reward += 1
        else:
            rewards.append(reward)
            reward_fields[reward_field] += 1
        keys[session.learning_key or "(none)"] += 1
        status[session.status or "(none)"] += 1
        review[session.review_status or "(none)"] += 1
        messages = session_to_messages(session)
        turns.append(len(messages) - 1)
        tokens.append(sum(len(m["content"]) for m in messages) // CHARS_PER_TOKEN)
        if progress and report.sessions % 500 == 0:
            progress(report.sessions)
    # Fixed bins of 0.1; a score outside [0, 1] counts in the nearest end bin (clamped before int(): 1e308 * 10
    # is inf). The mean divides before it adds, so huge scores cannot overflow it either.
    per_bin = Counter(int(min(max(r * REWARD_BINS, 0), REWARD_BINS - 1)) for r in rewards)
    report.reward = [Bin(f"{i / REWARD_BINS:.1f}-{(i + 1) / REWARD_BINS:.1f}", per_bin[i]) for i in range(REWARD_BINS)]
    report.reward_mean = sum(r / len(rewards) for r in rewards) if rewards else None
    report.reward_fields = _counts(reward_fields)
    report.learning_keys = _counts(keys, top)
    report.status = _counts(status)
    report.review_status = _counts(review)
    report.turns = _edge_bins(turns, TURN_EDGES)
    report.approx_tokens = _edge_bins(tokens, TOKEN_EDGES)
    return report


def plot_report(report: InspectReport, path: str) -> None:
    """The four histograms in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("Reward", report.reward + [Bin("none", report.no_reward)]),
              ("learning_key", report.learning_keys), ("Turns per conversation", report.turns),
              ("Approx. tokens per conversation", report.approx_tokens)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (title, bins) in zip(axes.flat, panels):
        labels = [b.label if len(b.label) <= 14 else b.label[:12] + "…" for b in bins]
        ax.bar(range(len(bins)), [b.count for b in bins], color="#4c72b0")
        ax.set_xticks(range(len(bins)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("sessions")
    fig.suptitle(f"{report.source}: {report.sessions} sessions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
