"""On-policy batches of multi-turn conversations grouped by the length of the prompt each step generates from.

An on-policy step draws one target turn per conversation and generates it from the recorded conversation before
it (gkd/collator.py). transformers' length-grouped sampler groups rows by their whole conversation's length, but
the drawn prompts of a batch differ as much as the turns drawn: in train_bench.py's multi-turn data, 27 % of the
prompt tokens of batches of 4 were padding over two epochs (1.2 % grouped by the drawn prompt), and the teacher's
forward, the student's prefill and backward ran over it. `TurnGroupedSampler` draws every row's turn when an
epoch's batches are made, instead of when each batch is collated, and groups rows by the drawn prompt's length
(transformers' `get_length_grouped_indices`: shuffled, then sorted within mega-batches of up to 50 batches); the
collator takes the turn drawn for the row, found by the row's index in `ROW_COLUMN` (`with_row_index`). Each row's
turn is still drawn uniformly from its promptable targets, once per epoch, from a generator seeded by the run's seed
and the epoch, so a resumed run draws the same turns.

The draws reach the collator through the trainer's process (`TargetSpanCollator.draws`): torch starts a data loader's
worker processes before it calls the sampler, so a collator in a worker would see the previous epoch's draws. The
trainer groups by turn only with `dataloader_num_workers` 0 (what `atlas-distill train` sets).
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from .collator import ROW_COLUMN, TargetSpanCollator


def several_turns(dataset) -> bool:
    """Whether some row of `dataset` has more than one target turn (a `targets` column with a longer list)."""
    return "targets" in getattr(dataset, "column_names", ()) and any(
        len(targets or ()) > 1 for targets in dataset["targets"])


def with_row_index(dataset):
    """`dataset` with each row's index in `ROW_COLUMN` (written anew over one it may already have)."""
    if ROW_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(ROW_COLUMN)
    return dataset.add_column(ROW_COLUMN, list(range(len(dataset))))


class TurnGroupedSampler(Sampler):
    """The rows of `dataset` in batches of `batch_size` grouped by their drawn turn's prompt length; each epoch's
    draws are handed to `collator`. The prompts' lengths are measured once, by the collator's own encoding."""

    def __init__(self, dataset, collator: TargetSpanCollator, batch_size: int, seed: int) -> None:
        self.dataset, self.collator, self.batch_size, self.seed, self.epoch = dataset, collator, batch_size, seed, 0
        self.prompt_lengths = [collator.prompt_lengths(example) for example in dataset]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def __iter__(self):
        rng = random.Random(f"{self.seed}:{self.epoch}")
        draws = [rng.randrange(len(lengths)) for lengths in self.prompt_lengths]
        self.collator.draws = dict(enumerate(draws))
        drawn = [lengths[k] for lengths, k in zip(self.prompt_lengths, draws)]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(drawn, self.batch_size, generator=generator))
