"""Evaluation: score generated turns, measure success rates and tokens, compare with the baseline.

Every target turn of an eval conversation (each action of the agent and the final answer; a
row without `targets` has its last turn only) is generated greedily from the recorded
conversation before it and judged against the recorded turn:
- `eval/success_rate`: the share of conversations whose final answer is judged right (by the
  configured scorer), as before multi-turn evaluation existed;
- `eval/step_success_rate`: the share of all target turns judged right (actions by `auto`: same
  tool and equal arguments for a tool call, the number for a number, else the text);
- `eval/episode_success_rate`: the share of conversations whose every target turn is right;
- `eval/avg_tokens`: tokens the model generates per episode (all its turns), up to each EOS.
A turn the model would answer exactly as recorded is found in one teacher-forced forward pass and
not generated (`generate_answers`), so a model that is mostly right is evaluated several times faster.
`compute_baseline_summary` turns success rate and tokens into the Baseline Comparison of DESIGN §4.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .summary import BaselineSummary, Figures

SCORERS = ("auto", "exact", "numeric", "json", "contains")

# A number as written in answers: -3, 42.0, .5, 1,200 (thousands groups only), $1,200.50, -$5.
_NUMBER = r"(?<![\w.])(-)?\$?(-)?((?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_FENCED = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL | re.IGNORECASE)


def _normalize(text: str) -> str:
    text = " ".join(text.split()).casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def _to_float(match: tuple[str, str, str]) -> float:
    value = float(match[2].replace(",", ""))
    return -value if match[0] or match[1] else value


def extract_number(text: str) -> float | None:
    """The GSM8K-style final answer: the number after the last `####`, else the last number in the text."""
    marked = re.findall(r"####\s*" + _NUMBER, text)
    found = marked or re.findall(_NUMBER, text)
    return _to_float(found[-1]) if found else None


def extract_json(text: str, *, embedded: bool = True) -> Any:
    """A JSON value from the whole text, else a ``` fenced block, else (if `embedded`) the first
    {...} or [...] that parses. Returns None when there is none (a JSON `null` is not a match)."""
    candidates = [text.strip(), *(block.strip() for block in _FENCED.findall(text))]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    if embedded:
        decoder = json.JSONDecoder()
        for start, char in enumerate(text):
            if char in "{[":
                try:
                    return decoder.raw_decode(text, start)[0]
                except ValueError:
                    continue
    return None


def _as_tool_call(value: Any) -> Any:
    """A tool call (or a list of them) is judged on tool and arguments only; ids and other keys are ignored."""
    if isinstance(value, list):
        return [_as_tool_call(item) for item in value]
    if not (isinstance(value, dict) and "tool" in value):
        return value
    arguments = value.get("arguments") or {}
    if isinstance(arguments, str):  # OpenAI style: arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return {"tool": value["tool"], "arguments": arguments}


def _same_data(a: Any, b: Any) -> bool:
    """Data equality: key order is irrelevant and 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_data(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_data(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _is_numeric(text: str) -> bool:
    """A bare number (`42`, `$1,200.50`, `15%`) or a GSM8K answer with `#### n`."""
    if re.search(r"####\s*" + _NUMBER, text):
        return True
    return re.fullmatch(r"\s*" + _NUMBER + r"\s*%?\.?\s*", text) is not None


def resolve_scorer(reference: str, scorer: str = "auto") -> str:
    """The concrete scorer for a reference: `auto` picks json, numeric or exact from its shape."""
    if scorer not in SCORERS:
        raise ValueError(f"Unknown scorer `{scorer}`; valid scorers: {', '.join(SCORERS)}.")
    if scorer != "auto":
        return scorer
    if isinstance(extract_json(reference, embedded=False), (dict, list)):
        return "json"
    return "numeric" if _is_numeric(reference) else "exact"


def score(prediction: str, reference: str, scorer: str = "auto") -> bool:
    """Whether `prediction` answers like `reference` under `scorer` (see SCORERS)."""
    kind = resolve_scorer(reference, scorer)
    if kind == "exact":
        return _normalize(prediction) == _normalize(reference)
    if kind == "contains":
        needle = _normalize(reference)
        return bool(needle) and needle in _normalize(prediction)
    if kind == "numeric":
        got, want = extract_number(prediction), extract_number(reference)
        return got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-6)
    got, want = extract_json(prediction), extract_json(reference)
    return got is not None and want is not None and _same_data(_as_tool_call(got), _as_tool_call(want))


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


def _eos_ids(model, tokenizer) -> list[int]:
    """The model's EOS ids (Qwen2.5 Instruct has two), else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def _prompt_ids(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    prompts = []
    for index, messages in enumerate(conversations):
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise ValueError(f"Conversation {index} must end with the reference assistant answer after a prompt.")
        text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


# generation_config settings that change greedy decoding, with the values that leave it alone
_NEUTRAL_DECODING = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
                     "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "sequence_bias": (None,),
                     "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
                     "forced_eos_token_id": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
                     "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False)}
_GROUP_KEY = 64  # at most this many first tokens (the system prompt) find the sequences that may share a pass


def _plain_greedy(model) -> bool:
    """Whether greedy decoding is the argmax of the model's logits at every step (no logits processor)."""
    config = getattr(model, "generation_config", None)
    return config is None or all(getattr(config, name, None) in neutral
                                 for name, neutral in _NEUTRAL_DECODING.items())


def _recorded_answer(tokenizer, messages: list[dict], prompt: list[int], stops: set[int],
                     max_new_tokens: int) -> list[int] | None:
    """The recorded answer's tokens up to and including its first EOS, as the chat template writes them after
    the prompt; None when the template does not extend the prompt, or the answer has no EOS within
    max_new_tokens (then only generating can tell what the model answers)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    if full[:len(prompt)] != prompt:
        return None
    rest = full[len(prompt):]
    end = next((pos for pos, tok in enumerate(rest) if tok in stops), None)
    return rest[:end + 1] if end is not None and end < max_new_tokens else None


def _hosts(sequences: dict[int, list[int]]) -> dict[int, list[int]]:
    """Groups sequences so that each rides on a longer one it is a prefix of (the turns of one episode: each
    turn's prompt and answer begin the next turn's prompt): {host: [the host and its riders]}."""
    groups: dict[int, list[int]] = {}
    by_start: dict[tuple[int, ...], list[int]] = {}  # hosts by their first tokens, to compare few sequences
    start = min([_GROUP_KEY, *(len(sequence) for sequence in sequences.values())])
    for i in sorted(sequences, key=lambda i: len(sequences[i]), reverse=True):
        sequence = sequences[i]
        key = tuple(sequence[:start])
        host = next((h for h in by_start.get(key, []) if sequences[h][:len(sequence)] == sequence), None)
        if host is None:
            by_start.setdefault(key, []).append(i)
            groups[i] = [i]
        else:
            groups[host].append(i)
    return groups


def _verified(model, prompts: list[list[int]], answers: dict[int, list[int]], stops: set[int], pad_id: int,
              batch_size: int, device) -> list[int]:
    """Which recorded answers the model itself would generate greedily: in a teacher-forced forward pass over
    prompt + answer, the argmax must be the answer's token at every position and an EOS at its end. Answers
    that begin a longer sequence (the earlier turns of an episode) are checked in that sequence's one pass. A
    batch with none verified ends the checking: a model that is not right yet (a student before training) pays
    for one batch's forward pass, not for all."""
    import torch

    from .gkd.divergence import backbone, plain_head

    sequences = {i: prompts[i] + answer for i, answer in answers.items()}
    groups = _hosts(sequences)
    hosts = list(groups)  # longest first
    right = []
    for start in range(0, len(hosts), batch_size):
        rows = hosts[start:start + batch_size]
        width = len(sequences[rows[0]])
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        checked = torch.zeros((len(rows), width), dtype=torch.bool)  # positions predicting an answer token
        for row, host in enumerate(rows):  # right-padded: each row's positions are 0, 1, ... as in generate
            input_ids[row, :len(sequences[host])] = torch.tensor(sequences[host])
            attention_mask[row, :len(sequences[host])] = 1
            for i in groups[host]:
                checked[row, len(prompts[i]) - 1:len(sequences[i]) - 1] = True
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        if plain_head(model):  # project only the checked positions, never B x L x V logits
            hidden = backbone(model)(**inputs, use_cache=False).last_hidden_state[checked.to(device)]
            argmax = model.get_output_embeddings()(hidden).argmax(-1)
        else:
            argmax = model(**inputs).logits[checked.to(device)].argmax(-1)
        predicted = torch.full((len(rows), width), -1, dtype=torch.long)
        predicted[checked] = argmax.cpu()
        found = []
        for row, host in enumerate(rows):
            tokens, guesses = sequences[host], predicted[row].tolist()
            for i in groups[host]:
                first, end = len(prompts[i]) - 1, len(sequences[i]) - 1  # positions predicting tokens first+1..end
                if guesses[first:end - 1] == tokens[first + 1:end] and guesses[end - 1] in stops:
                    found.append(i)
        if not found:
            break
        right += found
    return right


def generate_answers(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int,
                     batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
                     verify: bool = True) -> list[Generation]:
    """Greedy answers to each conversation's prompt (all messages but the last), in input order.

    Prompts are batched by similar length and left-padded by hand, so the caller's tokenizer is
    never changed. Sampling is off; the rest of the model's generation_config (e.g. a
    repetition_penalty) still applies. `progress(done, total)` is called after each batch.

    With `verify` (and plain greedy decoding), each recorded answer is first checked in one
    teacher-forced forward pass: where the model's argmax reproduces it token by token and then
    ends it, that answer is what greedy generation would give (up to float rounding in near-ties),
    and it is not generated. A model that mostly answers as recorded (a teacher, a trained
    student) is evaluated several times faster; the rest are generated as before. Pass
    verify=False where every process must make the same calls (FSDP, ZeRO-3).
    """
    import torch

    eos_ids = _eos_ids(model, tokenizer)
    stops = set(eos_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    prompts = _prompt_ids(tokenizer, conversations)
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if verify and _plain_greedy(model):
                answers = {i: answer for i, messages in enumerate(conversations)
                           if (answer := _recorded_answer(tokenizer, messages, prompts[i], stops, max_new_tokens))}
                for i in _verified(model, prompts, answers, stops, pad_id, batch_size, device):
                    tokens = answers[i][:-1]
                    results[i] = Generation(text=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                                            tokens=len(tokens))
            known = len(prompts) - results.count(None)
            order = sorted((i for i in range(len(prompts)) if results[i] is None), key=lambda i: len(prompts[i]),
                           reverse=True)
            if progress and known:
                progress(known, len(prompts))
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                width = max(len(prompts[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for row, i in enumerate(rows):
                    input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                    attention_mask[row, width - len(prompts[i]):] = 1
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                    eos_token_id=eos_ids, pad_token_id=pad_id,
                )
                # Rows end at their first EOS; what follows is padding (pad == eos for some tokenizers).
                for row, i in enumerate(rows):
                    new = output[row, width:].tolist()
                    length = next((pos for pos, tok in enumerate(new) if tok in stops), len(new))
                    text = tokenizer.decode(new[:length], skip_special_tokens=True).strip()
                    results[i] = Generation(text=text, tokens=length)
                if progress:
                    progress(known + min(start + batch_size, len(order)), len(prompts))
    finally:
        model.train(was_training)
    return results


def turn_prompts(tokenizer, conversation: list[dict], targets: list[int] | None) -> list[list[dict]]:
    """One conversation per target turn: the recorded turns before it and the turn itself (the reference)."""
    from .target_spans import chat_messages, final_targets, supports_tool_role

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


def evaluate_conversations(model, tokenizer, conversations: list[list[dict]], references: list[str], *,
                           targets: list[list[int] | None] | None = None, scorer: str = "auto", max_new_tokens: int,
                           batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
                           verify: bool = True) -> EvalResult:
    """Generate every target turn of each conversation (all in one batched pass) and judge it.

    `targets[i]` lists conversation i's target turns (None or absent: its last turn). The final answer is
    judged against `references[i]` by `scorer`; the other target turns against the recorded turn by `auto`.
    `progress(done, total)` counts turns; `verify`: see `generate_answers`."""
    if len(conversations) != len(references):
        raise ValueError(f"{len(conversations)} conversations but {len(references)} references.")
    if not conversations:
        raise ValueError("No conversations to evaluate; the eval split is empty.")
    resolve_scorer("", scorer)  # an unknown scorer fails before any generation
    turns = episode_turns(tokenizer, conversations, targets)
    generations = generate_answers(model, tokenizer, [turn for episode in turns for turn in episode],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                                   verify=verify)
    return judge(turns, generations, references, scorer)


def _rates(eval_results: Any) -> tuple[float, float]:
    if isinstance(eval_results, EvalResult | Figures):
        eval_results = eval_results.to_dict()
    if isinstance(eval_results, dict):
        def get(key: str) -> Any:  # ours, a metrics.jsonl record, or what transformers' evaluate() returns
            return next((eval_results[k] for k in (key, f"eval/{key}", f"eval_{key}") if k in eval_results), None)

        rate, tokens = get("success_rate"), get("avg_tokens")
        if get("count") == 0:
            raise ValueError("The eval results are empty (count 0).")
        if rate is None or tokens is None:
            raise ValueError("Eval results need `success_rate` and `avg_tokens` (or `eval/success_rate` or "
                             "`eval_success_rate`, as trainer.evaluate() returns them, ...).")
        return float(rate), float(tokens)
    episodes = [asdict(e) if isinstance(e, Episode) else e for e in eval_results]
    if not episodes:
        raise ValueError("The eval results are empty: no episodes.")
    return (sum(bool(e["success"]) for e in episodes) / len(episodes),
            sum(e["tokens"] for e in episodes) / len(episodes))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def baseline_summary(eval_results, baseline_success: float, baseline_tokens: float | None = None, *,
                     success_target: float = 0.10, token_target: float = 30.0) -> BaselineSummary:
    """The Baseline Comparison: success delta, token reduction (%), which targets are met."""
    if not (_is_number(baseline_success) and 0.0 <= baseline_success <= 1.0):
        raise ValueError(f"`baseline_success` must be a number in [0, 1] (resolve `auto` first); "
                         f"got {baseline_success!r}.")
    if baseline_tokens is not None and not (_is_number(baseline_tokens) and baseline_tokens >= 0):
        raise ValueError(f"`baseline_tokens` must be a non-negative number or None (resolve `auto` first); "
                         f"got {baseline_tokens!r}.")
    success_rate, avg_tokens = _rates(eval_results)
    delta = success_rate - baseline_success
    reduction = (baseline_tokens - avg_tokens) / baseline_tokens * 100 if baseline_tokens else None
    # A small tolerance so that e.g. 0.85 - 0.75 (0.0999...98 in floats) meets a 0.10 target.
    return BaselineSummary(
        success_rate=success_rate, avg_tokens=avg_tokens, baseline_success=float(baseline_success),
        baseline_tokens=None if baseline_tokens is None else float(baseline_tokens), success_delta=delta,
        token_reduction_pct=reduction, success_target=success_target, token_target=token_target,
        meets_success_target=delta >= success_target - 1e-9,
        meets_token_target=None if reduction is None else reduction >= token_target - 1e-9)


def compute_baseline_summary(eval_results, baseline_success: float, baseline_tokens: float | None = None, *,
                             success_target: float = 0.10, token_target: float = 30.0) -> dict[str, Any]:
    """Upstream's API: `baseline_summary` as a dict, with upstream's `meets_all_targets` beside `meets_target`."""
    summary = baseline_summary(eval_results, baseline_success, baseline_tokens, success_target=success_target,
                               token_target=token_target)
    return summary.to_dict() | {"meets_all_targets": summary.meets_target}


def format_baseline_line(summary: BaselineSummary) -> str:
    """`✅ Baseline Comparison targets MET: success delta=12.3 pp, token reduction=35.2%` (as upstream)."""
    head = "✅ Baseline Comparison targets MET" if summary.meets_target else "❌ Baseline Comparison targets NOT met"
    line = f"{head}: success delta={summary.success_delta_pp:.1f} pp"
    if summary.token_reduction_pct is not None:
        line += f", token reduction={summary.token_reduction_pct:.1f}%"
    return line


def format_reference_line(baseline_success: float, baseline_tokens: float | None) -> str:
    """`Starting GKD training with Baseline Comparison reference: success=75.00%, tokens=1200`."""
    if baseline_tokens is None:
        tokens = "n/a"
    else:
        tokens = f"{int(baseline_tokens)}" if float(baseline_tokens).is_integer() else f"{baseline_tokens:.1f}"
    return f"Starting GKD training with Baseline Comparison reference: success={baseline_success:.2%}, tokens={tokens}"
