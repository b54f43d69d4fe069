"""Batches of multi-turn conversations for GKD: every target turn labelled, one turn chosen for on-policy.

Each row is `messages` plus `targets` (the message indices the student learns; a row
without it, as `data.targets: final` writes, has its last turn as the only target).

- Off-policy (lmbda 0, the warm-up, seq_kd's input): `input_ids` is the whole conversation and
  `labels` holds the tokens of every target span (-100 elsewhere), so one forward pass covers
  every action of the episode.
- On-policy: per row one target turn is drawn uniformly from its targets by a generator seeded
  with the trainer's seed; `prompts` is the recorded conversation before that turn (tool
  results and guidance replayed exactly as recorded), from which the student generates the turn.
  Where the trainer's sampler has drawn the row's turn for this epoch already (`draws`, by the
  row's `ROW_COLUMN`: gkd/turn_sampler.py, which groups rows by the drawn prompt's length),
  that turn is taken instead.

For a row with one target (the final answer) that fits max_length the tensors equal
those of TRL's DataCollatorForChatML (a test checks it): `data.targets: final` trains as
before. A longer one loses whole turns from the left (target_spans.py), where TRL cut
tokens from the left, through the system turn.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ..target_spans import encode_to_fit, final_targets


def _left_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
    return out


ROW_COLUMN = "turn_row"  # a training row's index, where the trainer's sampler draws its on-policy turns


class TargetSpanCollator:
    def __init__(self, tokenizer, max_length: int | None, *, seed: int = 42, ignore_index: int = -100) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` before training.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.ignore_index = ignore_index
        self.turn_rng = random.Random(seed)
        self.draws: dict[int, int] = {}  # row (ROW_COLUMN) -> which of its promptable turns, drawn by a sampler

    def _encoded(self, example: dict[str, Any]):
        messages = example["messages"]
        encoded = encode_to_fit(self.tokenizer, messages, example.get("targets") or final_targets(messages),
                                self.max_length)
        # A target whose start was cut away (the token cut) is still learnt off-policy, but it has no prompt.
        promptable = [i for i, (start, _) in enumerate(encoded.spans) if start > 0]
        if not promptable:
            raise ValueError(f"A conversation has no target turn with a prompt before it left after fitting "
                             f"max_length={self.max_length}; raise max_length.")
        return encoded, promptable

    def prompt_lengths(self, example: dict[str, Any]) -> list[int]:
        """The tokens before each target turn an on-policy step can draw of `example`: the prompts it would get."""
        encoded, promptable = self._encoded(example)
        return [encoded.spans[i][0] for i in promptable]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels, prompts, chosen = [], [], [], []
        for example in examples:
            encoded, promptable = self._encoded(example)
            drawn = self.draws.get(example.get(ROW_COLUMN, -1))
            if drawn is None:
                drawn = self.turn_rng.randrange(len(promptable))
            elif drawn >= len(promptable):
                raise ValueError(f"Row {example[ROW_COLUMN]} has {len(promptable)} target turns with a prompt, but the "
                                 f"sampler drew its turn {drawn}: the rows are not the ones the sampler measured.")
            pick = promptable[drawn]
            ids.append(encoded.ids)
            labels.append(encoded.labels(self.ignore_index))
            prompts.append(encoded.ids[: encoded.spans[pick][0]])
            chosen.append(pick)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": _left_pad(ids, pad),
            "attention_mask": _left_pad([[1] * len(row) for row in ids], 0),
            "labels": _left_pad(labels, self.ignore_index),
            "prompts": _left_pad(prompts, pad),
            "prompt_attention_mask": _left_pad([[1] * len(row) for row in prompts], 0),
            "target_span": torch.tensor(chosen, dtype=torch.long),
        }
