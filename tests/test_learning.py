"""Distillation does what it is for: a student that gets a task wrong gets it right after a short GKD run.

Tiny models, a memorisable task (four questions with an answer no model could guess), a teacher that has
learned it: `train` through the real CLI must move the student from wrong to right, in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# The hidden rule: every vault opens with the same word, one no untrained model answers.
QUESTIONS = {f"Which word opens vault {name}?": "marigold" for name in ("A", "B", "C", "D")}


def conversation(question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": f"Task: {question}"}, {"role": "user", "content": question}]
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def teach(student_dir: Path, out: Path, steps: int = 150) -> Path:
    """Plain supervised fine-tuning of a tiny model on the four answers (loss on the answer and its end)."""
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    torch.manual_seed(0)
    batch = []
    for question, answer in QUESTIONS.items():
        prompt = tokenizer.apply_chat_template(conversation(question), add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(conversation(question, answer), return_dict=True)["input_ids"]
        batch.append((torch.tensor(full), len(prompt)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for ids, prompt_length in batch:
            labels = ids.clone()
            labels[:prompt_length] = -100
            loss = loss + model(input_ids=ids[None], labels=labels[None]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_traces(path: Path, sessions_per_question: int = 12) -> Path:
    lines = []
    for n in range(sessions_per_question * len(QUESTIONS)):
        question, answer = list(QUESTIONS.items())[n % len(QUESTIONS)]
        lines.append(json.dumps({"task": question, "final_answer": answer,
                                 "session_metadata": {"session_id": n + 1},
                                 "reward_stats": {"score": 1.0}}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_short_gkd_run_turns_wrong_answers_into_right_ones(cli, make_tiny_model, tmp_path):
    teacher = teach(make_tiny_model(seed=5), tmp_path / "teacher")
    traces = write_traces(tmp_path / "vaults.jsonl")
    # off-policy forward KL (lmbda 0, beta 0) at a high learning rate: the student learns what the teacher says.
    # 100 steps: the teacher is what `auto` loads here (fp32, bf16, or bf16 weights computed in fp32 on a CPU without
    # native bf16), and with the last one 40 steps left one eval session of eight short of the word; with AdamW's
    # moments in bf16 (compact_optimizer, the CPU default) 60 steps left every session short on an AVX2 CPU, where
    # the fp32 AdamW got there in 60 and the compact one in 100.
    result = cli("train", "--teacher", str(teacher), "--student", str(make_tiny_model(seed=1)),
                 "--traces", str(traces), "--max-steps", "100", "--run-name", "vaults",
                 "data.prompt=task", "data.review_status=null", "data.eval_split=0.25", "trainer.min_reward=null",
                 "trainer.lmbda=0", "trainer.beta=0", "trainer.learning_rate=5e-2",
                 "trainer.lr_scheduler_type=constant", "trainer.per_device_train_batch_size=4",
                 "trainer.max_new_tokens=4", "trainer.scorer=exact", "trainer.eval_max_sessions=100",
                 "trainer.eval_steps=1000", "trainer.report_to=[]", "trainer.max_length=128", "--json")
    assert result.code == 0, result.stderr
    summary = result.json()
    evaluated = summary["data"]["eval_used"]
    assert evaluated >= 6 and summary["data"]["train"] >= 30
    assert summary["teacher_eval"]["success_rate"] == 1.0  # the teacher knows the word
    assert summary["student_before"]["success_rate"] == 0.0  # the student does not
    assert summary["eval"]["success_rate"] == 1.0, summary["eval"]  # and learned it from the teacher
