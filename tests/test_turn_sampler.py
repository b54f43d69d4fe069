"""On-policy multi-turn batches grouped by the drawn turn's prompt length (gkd/turn_sampler.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_pt_utils import LengthGroupedSampler

from atlas_distill.gkd import AtlasGKDTrainer, GKDConfig
from atlas_distill.gkd.collator import ROW_COLUMN, TargetSpanCollator
from atlas_distill.gkd.turn_sampler import TurnGroupedSampler, with_row_index

WORDS = "search the contact create a lead rate it and call the tool with this email address".split()


def conversations(n: int = 48, seed: int = 0, turns: tuple[int, int] = (1, 6)) -> list[dict]:
    """Agent-like rows: a system turn, then 1-6 exchanges of a user turn and an assistant action (each a target)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": "You are a CRM agent."}]
        for _ in range(rng.randint(*turns)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))})
        rows.append({"messages": messages, "targets": [i for i, m in enumerate(messages) if m["role"] == "assistant"],
                     "reference": messages[-1]["content"]})
    return rows


def trainer_for(tmp_path, make_tiny_model, rows, **settings):
    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model(seed=1))
    args = GKDConfig(**{"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 4, "max_steps": 2,
                        "report_to": [], "use_cpu": True, "save_strategy": "no", "disable_tqdm": True,
                        "max_length": 512, "max_new_tokens": 2, "bf16": False, "lmbda": 1.0, "seed": 3,
                        "logging_steps": 1, **settings})
    return AtlasGKDTrainer(model=AutoModelForCausalLM.from_pretrained(make_tiny_model(seed=1)),
                           teacher_model=AutoModelForCausalLM.from_pretrained(make_tiny_model(seed=2)),
                           args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def prompt_padding(trainer) -> float:
    """The fraction of an epoch's on-policy prompt tokens that are padding, batch by batch as the trainer draws."""
    padded = real = 0
    for batch in trainer.get_train_dataloader():
        mask = batch["prompt_attention_mask"]
        padded, real = padded + mask.numel(), real + int(mask.sum())
    return 1 - real / padded


def test_batches_are_grouped_by_the_drawn_prompt_and_the_collator_takes_the_drawn_turn(tmp_path, make_tiny_model):
    rows = conversations(n=400)  # enough rows for mega-batches of 25 batches (transformers: len // (4 x batch))
    grouped = trainer_for(tmp_path, make_tiny_model, rows)
    assert grouped.groups_by_turn and grouped.train_dataset[ROW_COLUMN] == list(range(len(rows)))
    by_conversation = trainer_for(tmp_path, make_tiny_model, rows, group_by_turn=False)
    assert not by_conversation.groups_by_turn
    assert isinstance(by_conversation._get_train_sampler(), LengthGroupedSampler)
    ours, before = prompt_padding(grouped), prompt_padding(by_conversation)
    assert before > 0.15 and ours < before / 3, (ours, before)

    sampler = grouped._get_train_sampler()
    assert isinstance(sampler, TurnGroupedSampler) and grouped._get_train_sampler() is sampler  # measured once
    collator = grouped.data_collator
    order = list(sampler)
    for start in range(0, len(order), 4):
        rows_of_batch = [grouped.train_dataset[i] for i in order[start:start + 4]]
        batch = collator(rows_of_batch)
        for row, pick, prompt in zip(rows_of_batch, batch["target_span"], batch["prompt_attention_mask"].sum(1)):
            lengths = sampler.prompt_lengths[row[ROW_COLUMN]]
            assert int(prompt) == lengths[collator.draws[row[ROW_COLUMN]]]
            assert int(pick) == collator.draws[row[ROW_COLUMN]]  # every target has a prompt here: the same index


def test_each_rows_turn_is_drawn_uniformly_once_per_epoch_and_again_the_same_on_resume(tmp_path, make_tiny_model):
    rows = conversations(n=12, turns=(4, 4))  # every row has four targets
    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model(seed=1))
    collator = TargetSpanCollator(tokenizer, 512, seed=3)
    dataset = Dataset.from_list(rows)
    sampler = TurnGroupedSampler(dataset, collator, 4, seed=3)
    epochs = []
    for epoch in range(60):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(12))
        epochs.append((order, dict(collator.draws)))
    counts = [sum(draws[row] == k for _, draws in epochs for row in range(12)) for k in range(4)]
    assert min(counts) > 0.8 * 180 and max(counts) < 1.2 * 180, counts  # 720 draws over 4 turns
    assert epochs[0][1] != epochs[1][1]
    again = TurnGroupedSampler(dataset, TargetSpanCollator(tokenizer, 512, seed=3), 4, seed=3)
    again.set_epoch(5)
    assert list(again) == epochs[5][0] and again.collator.draws == epochs[5][1]


@pytest.mark.parametrize("settings, grouped", [
    ({}, True),
    ({"lmbda": 0.5}, True),
    ({"lmbda": 0.25}, False),  # mostly off-policy: whole conversations, grouped by their own length
    ({"lmbda": 0.0, "seq_kd": True}, True),  # the teacher generates from the drawn prompts
    ({"group_by_turn": False}, False),
    ({"group_by_length": False}, False),
    ({"dataloader_num_workers": 2}, False),  # a worker's collator would not see the sampler's draws
])
def test_turn_grouping_applies_where_most_steps_generate_from_a_drawn_turn(tmp_path, make_tiny_model, settings,
                                                                          grouped):
    trainer = trainer_for(tmp_path, make_tiny_model, conversations(n=8), **settings)
    assert trainer.groups_by_turn is grouped
    assert isinstance(trainer._get_train_sampler(), TurnGroupedSampler) is grouped
    assert (ROW_COLUMN in trainer.train_dataset.column_names) is grouped


def test_one_target_per_row_keeps_the_conversation_length_grouping(tmp_path, make_tiny_model):
    trainer = trainer_for(tmp_path, make_tiny_model, conversations(n=8, turns=(1, 1)))
    assert not trainer.groups_by_turn and isinstance(trainer._get_train_sampler(), LengthGroupedSampler)


def test_a_new_training_dataset_is_measured_again_and_rows_out_of_step_with_the_draws_are_an_error(
        tmp_path, make_tiny_model):
    trainer = trainer_for(tmp_path, make_tiny_model, conversations(n=8))
    first = trainer._get_train_sampler()
    trainer.train_dataset = with_row_index(Dataset.from_list(conversations(n=12, seed=1)))
    again = trainer._get_train_sampler()
    assert again is not first and len(again) == 12 and again.dataset is trainer.train_dataset
    list(again)  # this epoch's draws, for rows 0-11
    row = dict(trainer.train_dataset[0])
    turns = len(again.prompt_lengths[0])
    trainer.data_collator.draws[0] = turns  # one past its last turn: the draws are not for these rows
    with pytest.raises(ValueError, match=f"Row 0 has {turns} target turns with a prompt, but the sampler drew"):
        trainer.data_collator([row])


def test_training_steps_generate_from_the_turns_the_sampler_drew(tmp_path, make_tiny_model, monkeypatch):
    trainer = trainer_for(tmp_path, make_tiny_model, conversations(n=8), max_steps=4)  # two epochs of two steps
    seen = []
    collate = TargetSpanCollator.__call__

    def recording(self, examples):
        batch = collate(self, examples)
        seen.extend((example[ROW_COLUMN], int(pick), dict(self.draws)) for example, pick in
                    zip(examples, batch["target_span"]))
        return batch

    monkeypatch.setattr(TargetSpanCollator, "__call__", recording)
    trainer.train()
    assert len(seen) >= 16 and all(draws and pick == draws[row] for row, pick, draws in seen)
    epochs = {tuple(sorted(draws.items())) for _, _, draws in seen}
    assert len(epochs) == 2  # each epoch's turns drawn anew


def test_train_bench_times_ours_on_random_batches_of_its_epoch_with_the_epochs_draws(tmp_path, make_tiny_model,
                                                                                      monkeypatch):
    """benchmarks/train_bench.py's `random_batches`: ours' length-grouped epoch starts with its longest batch, so the
    benchmark times batches picked at random from the epoch instead, each row generating from its drawn turn."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from train_bench import random_batches

    trainer = trainer_for(tmp_path, make_tiny_model, conversations(n=400), max_steps=3)
    epoch = list(trainer._get_train_sampler())
    batches = [tuple(epoch[i:i + 4]) for i in range(0, len(epoch), 4)]
    random_batches(trainer, 3, seed=0)
    draws = dict(trainer.data_collator.draws)
    rows = list(trainer._get_train_sampler())
    picked = [tuple(rows[i:i + 4]) for i in range(0, len(rows), 4)]
    assert len(picked) == 3 and len(set(picked)) == 3 and set(picked) <= set(batches)
    assert picked != batches[:3]

    seen = []
    collate = TargetSpanCollator.__call__

    def recording(self, examples):
        batch = collate(self, examples)
        seen.append(tuple(example[ROW_COLUMN] for example in examples))
        assert [int(pick) for pick in batch["target_span"]] == [draws[example[ROW_COLUMN]] for example in examples]
        return batch

    monkeypatch.setattr(TargetSpanCollator, "__call__", recording)
    trainer.train()
    assert seen == picked
