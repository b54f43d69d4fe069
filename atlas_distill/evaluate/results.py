"""An evaluation's results: each turn's generation, each episode's verdicts, the rates over all of them; and how
a conversation's target turns become the prompts to generate and are judged."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..runs.summary import Figures
from .scoring import score


@dataclass
class Generation:
    """One greedy answer."""

    text: str
    """The decoded answer, special tokens removed, stripped."""
    tokens: int
    """Tokens generated before the first EOS (padding and the EOS itself excluded)."""


@dataclass
class Episode:
    """One eval conversation: the generated final answer, its reference, the verdicts and the tokens spent."""

    prediction: str
    reference: str
    success: bool
    """The final answer is judged right."""
    tokens: int
    """Tokens generated over all the episode's target turns."""
    steps: list[bool] = field(default_factory=list)
    """The verdict of each target turn, in order (the final answer last)."""

    @property
    def all_steps_right(self) -> bool:
        return all(self.steps) if self.steps else self.success


@dataclass
class EvalResult:
    """`eval/success_rate`, `eval/step_success_rate`, `eval/episode_success_rate` and `eval/avg_tokens`."""

    success_rate: float
    avg_tokens: float
    count: int
    episodes: list[Episode] = field(default_factory=list)
    step_success_rate: float | None = None
    episode_success_rate: float | None = None

    @classmethod
    def of(cls, episodes: list[Episode]) -> EvalResult:
        steps = [verdict for e in episodes for verdict in (e.steps or [e.success])]
        return cls(success_rate=sum(e.success for e in episodes) / len(episodes),
                   avg_tokens=sum(e.tokens for e in episodes) / len(episodes), count=len(episodes),
                   episodes=episodes, step_success_rate=sum(steps) / len(steps),
                   episode_success_rate=sum(e.all_steps_right for e in episodes) / len(episodes))

    def figures(self) -> Figures:
        """The figures a summary keeps (no episodes)."""
        return Figures(success_rate=self.success_rate, avg_tokens=self.avg_tokens,
                       step_success_rate=self.step_success_rate, episode_success_rate=self.episode_success_rate)

    def to_dict(self, *, include_episodes: bool = False) -> dict[str, Any]:
        data = self.figures().to_dict() | {"count": self.count}
        if include_episodes:
            data["episodes"] = [asdict(episode) for episode in self.episodes]
        return data


def turn_prompts(tokenizer, conversation: list[dict], targets: list[int] | None) -> list[list[dict]]:
    """One conversation per target turn: the recorded turns before it and the turn itself (the reference)."""
    from ..target_spans import chat_messages, final_targets, supports_tool_role

    messages, mapped = chat_messages(conversation, targets or final_targets(conversation),
                                     tool_role=supports_tool_role(tokenizer))
    return [messages[: t + 1] for t in mapped]


def episode_turns(tokenizer, conversations: list[list[dict]],
                  targets: list[list[int] | None] | None = None) -> list[list[list[dict]]]:
    """Each conversation's target turns to generate (`turn_prompts`), episode by episode."""
    targets = targets or [None] * len(conversations)
    return [turn_prompts(tokenizer, messages, tg) for messages, tg in zip(conversations, targets, strict=True)]


def judge(turns: list[list[list[dict]]], generations: list[Generation], references: list[str],
          scorer: str = "auto") -> EvalResult:
    """Score the generations (all episodes' turns, in order): the final answer against its reference by
    `scorer`, every other target turn against the recorded turn by `auto`."""
    made = iter(generations)
    episodes = []
    for episode, reference in zip(turns, references, strict=True):
        outputs = [next(made) for _ in episode]
        verdicts = [score(g.text, turn[-1]["content"], "auto") for g, turn in zip(outputs[:-1], episode[:-1])]
        final_right = score(outputs[-1].text, reference, scorer)
        episodes.append(Episode(outputs[-1].text, reference, final_right, sum(g.tokens for g in outputs),
                                verdicts + [final_right]))
    return EvalResult.of(episodes)
