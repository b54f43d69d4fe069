"""A conversation with targets, rendered by the tokenizer's chat template: token ids and the target spans.

The student learns the tokens of its target turns only (each assistant action and the
final answer: the turn's text and its end-of-turn token(s), as the template writes
them). Spans are found from the template itself: the text rendered up to a turn with
the generation prompt is where the turn's tokens start, the text rendered through the
turn is where they end; the whole conversation is tokenized once and each token is in
a span when its first character is. No string is searched for.

Tool results go in as the template's `tool` role when the template names that role
(Qwen2.5 does); otherwise (SmolLM2) as a user turn `Tool result: ...`, merged with the
user text that follows, so roles alternate for templates that require it.

Too long for `max_length`: whole turns are cut from the left of the conversation (the
system turn stays); a target cut that way is lost for that row. A conversation still too
long keeps its last `max_length` tokens, as TRL's collator does.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelSpecError

TOOL_RESULT_PREFIX = "Tool result: "


def final_targets(messages: list[dict[str, str]]) -> list[int]:
    """The targets of a row without a `targets` key (`data.targets: final`): its last turn."""
    return [len(messages) - 1]


_PROBE = "tool-result-probe-7f3a"
_TOOL_ROLE: dict[str, bool] = {}  # by template text: the collator asks for every example of every batch


def supports_tool_role(tokenizer) -> bool:
    """Whether the template renders a `tool` turn as such: one that names the role and renders a bare tool
    message (some templates mention tools but require call ids) with its text. Probed once per template."""
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    if "tool" not in template:
        return False
    if template not in _TOOL_ROLE:
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                 {"role": "assistant", "content": "a"}, {"role": "tool", "content": _PROBE}]
        try:
            _TOOL_ROLE[template] = _PROBE in tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses the probe has no usable tool role
            _TOOL_ROLE[template] = False
    return _TOOL_ROLE[template]


def chat_messages(messages: list[dict[str, str]], targets: list[int], *,
                  tool_role: bool) -> tuple[list[dict[str, str]], list[int]]:
    """The messages as the template is given them (tool turns mapped when it lacks the role), and the targets'
    indices among them."""
    if tool_role or not any(m["role"] == "tool" for m in messages):
        return messages, list(targets)
    out: list[dict[str, str]] = []
    moved: dict[int, int] = {}
    for index, message in enumerate(messages):
        role, text = message["role"], message["content"]
        if role == "tool":
            role, text = "user", TOOL_RESULT_PREFIX + text
        if role == "user" and out and out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + text}
        else:
            out.append({"role": role, "content": text})
        moved[index] = len(out) - 1
    return out, [moved[t] for t in targets]


@dataclass
class EncodedConversation:
    ids: list[int]
    spans: list[tuple[int, int]]
    """[start, end) token positions of each kept target, in order."""
    targets: list[int]
    """The message index of each kept target (in `messages`)."""
    messages: list[dict[str, str]]
    """The messages encoded (after tool-role mapping and any left cut)."""
    cut_turns: int = 0
    """Whole turns (of the conversation as given, tool results included) cut from the left to fit max_length."""
    cut_tokens: int = 0
    """Tokens cut from the left after that (a conversation whose system turn and last turn alone exceed it)."""

    def labels(self, ignore_index: int = -100) -> list[int]:
        labels = [ignore_index] * len(self.ids)
        for start, end in self.spans:
            labels[start:end] = self.ids[start:end]
        return labels


class TemplateError(ModelSpecError):
    """The chat template does not render a conversation's prefixes as prefixes of the whole."""


def _render(tokenizer, messages, *, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _tokenize(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and each token's [start, end) characters (a fast tokenizer's offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ModelSpecError(
            f"The tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer, so it gives no character offsets "
            "and the tokens of each target turn cannot be located.",
            fix="Use the model's fast tokenizer (tokenizer.json), or train on the final answer only "
            "(data.targets=final).")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], [tuple(offsets) for offsets in encoded["offset_mapping"]]


def _check_targets(messages: list[dict[str, str]], targets: list[int]) -> None:
    if any(b <= a for a, b in zip(targets, targets[1:])):
        raise ValueError(f"Target turns must be increasing message indices, got {targets}.")
    for t in targets:
        if not 0 < t < len(messages) or messages[t].get("role") != "assistant":
            raise ValueError(f"Target {t} is not an assistant turn of this {len(messages)}-message conversation.")


def encode(tokenizer, messages: list[dict[str, str]], targets: list[int]) -> EncodedConversation:
    """Token ids of the whole conversation and the token span of every target turn."""
    _check_targets(messages, targets)
    full = _render(tokenizer, messages)
    char_spans = []
    for t in targets:
        prefix = _render(tokenizer, messages[:t], generation_prompt=True)
        through = _render(tokenizer, messages[: t + 1])
        if not (full.startswith(through) and through.startswith(prefix)):
            raise TemplateError(
                "The tokenizer's chat template renders the start of a conversation differently from the whole "
                "conversation (it changes earlier turns once later ones follow), so the tokens of each target turn "
                "cannot be located.",
                fix="Train on the final answer only (data.targets=final), or use a tokenizer whose chat template "
                "renders each turn the same whatever follows it.")
        char_spans.append((len(prefix), len(through)))
    ids, offsets = _tokenize(tokenizer, full)
    spans = []
    for lo, hi in char_spans:
        # A token that straddles the turn's start (`: {` after a template's "assistant: ") is the turn's.
        first = next((i for i, (_, end) in enumerate(offsets) if end > lo), len(ids))
        last = next((i for i, (start, _) in enumerate(offsets) if start >= hi), len(ids))
        spans.append((first, last))
    return EncodedConversation(ids, spans, list(targets), messages)


def _cut_first_turns(messages, targets):
    """Drop the first turn after the system turn, and what follows it up to the next user turn."""
    keep_system = 1 if messages and messages[0]["role"] == "system" else 0
    end = keep_system + 1
    while end < len(messages) and messages[end]["role"] != "user":
        end += 1
    removed = end - keep_system
    kept = messages[:keep_system] + messages[end:]
    return kept, [t - removed for t in targets if t >= end], removed


def encode_to_fit(tokenizer, messages: list[dict[str, str]], targets: list[int],
                  max_length: int | None) -> EncodedConversation:
    """`encode`, cutting whole turns from the left (never the system turn or the last target) until it fits."""
    tool_role = supports_tool_role(tokenizer)
    encoded = encode(tokenizer, *chat_messages(messages, targets, tool_role=tool_role))
    cut = 0
    while max_length is not None and len(encoded.ids) > max_length:
        kept, kept_targets, removed = _cut_first_turns(messages, targets)
        if not kept_targets or kept_targets[-1] != targets[-1] - removed or len(kept) < 2:
            break
        messages, targets, cut = kept, kept_targets, cut + removed
        encoded = encode(tokenizer, *chat_messages(messages, targets, tool_role=tool_role))
    encoded.cut_turns = cut
    if max_length is not None and len(encoded.ids) > max_length:
        excess = len(encoded.ids) - max_length
        encoded.cut_tokens = excess
        encoded.ids = encoded.ids[excess:]
        spans = [(max(s - excess, 0), e - excess) for s, e in encoded.spans]
        keep = [i for i, (s, e) in enumerate(spans) if e > s]
        encoded.spans = [spans[i] for i in keep]
        encoded.targets = [encoded.targets[i] for i in keep]
    return encoded
