"""Generating every target turn greedily, in batches, verifying first the turns the model would answer as
recorded (one teacher-forced forward pass per episode); `evaluate_conversations` generates and judges."""

from __future__ import annotations

from typing import Callable

from .results import EvalResult, Generation, episode_turns, judge
from .scoring import resolve_scorer


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

    from ..gkd.divergence import backbone, plain_head

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
                     verify: bool = True, sharded: bool = False) -> list[Generation]:
    """Greedy answers to each conversation's prompt (all messages but the last), in input order.

    Prompts are batched by similar length and left-padded by hand, so the caller's tokenizer is
    never changed. Sampling is off; the rest of the model's generation_config (e.g. a
    repetition_penalty) still applies. `progress(done, total)` is called after each batch.

    With `verify` (and plain greedy decoding), each recorded answer is first checked in one
    teacher-forced forward pass: where the model's argmax reproduces it token by token and then
    ends it, that answer is what greedy generation would give (up to float rounding in near-ties),
    and it is not generated. A model that mostly answers as recorded (a teacher, a trained
    student) is evaluated several times faster; the rest are generated as before. Pass
    verify=False where every process must make the same calls. `sharded`: the model's weights are sharded
    across processes (FSDP, ZeRO-3): nothing is verified, it runs under no_grad rather than inference_mode
    (which FSDP's parameter handling does not allow), and with several processes each decodes until every
    process is done (synced_gpus: every step all-gathers weights).
    """
    import torch

    synced = sharded and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    eos_ids = _eos_ids(model, tokenizer)
    stops = set(eos_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    prompts = _prompt_ids(tokenizer, conversations)
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad() if sharded else torch.inference_mode():
            if verify and not sharded and _plain_greedy(model):
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
                    eos_token_id=eos_ids, pad_token_id=pad_id, **({"synced_gpus": True} if synced else {}),
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


def evaluate_conversations(model, tokenizer, conversations: list[list[dict]], references: list[str], *,
                           targets: list[list[int] | None] | None = None, scorer: str = "auto", max_new_tokens: int,
                           batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
                           verify: bool = True, sharded: bool = False) -> EvalResult:
    """Generate every target turn of each conversation (all in one batched pass) and judge it.

    `targets[i]` lists conversation i's target turns (None or absent: its last turn). The final answer is
    judged against `references[i]` by `scorer`; the other target turns against the recorded turn by `auto`.
    `progress(done, total)` counts turns; `verify` and `sharded`: see `generate_answers`."""
    if len(conversations) != len(references):
        raise ValueError(f"{len(conversations)} conversations but {len(references)} references.")
    if not conversations:
        raise ValueError("No conversations to evaluate; the eval split is empty.")
    resolve_scorer("", scorer)  # an unknown scorer fails before any generation
    turns = episode_turns(tokenizer, conversations, targets)
    generations = generate_answers(model, tokenizer, [turn for episode in turns for turn in episode],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                                   verify=verify, sharded=sharded)
    return judge(turns, generations, references, scorer)
