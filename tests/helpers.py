"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from atlas_distill.db import connect


def db_ids(url: str, where: str = "true", params: tuple = ()) -> list[int]:
    """Session ids matching a hand-written SQL condition: the oracle the filters are checked against."""
    with connect(url) as conn:
        return [r[0] for r in conn.execute(f"SELECT id FROM sessions s WHERE {where} ORDER BY id", params)]


def greedy_answers(model_dir, conversations, max_new_tokens: int) -> list[str]:
    """Plain transformers, one conversation at a time: the answer to each conversation's last turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    answers = []
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def startup_hook(directory: Path, source: str) -> dict[str, str]:
    """A sitecustomize.py holding `source` in a new `directory`, which Python runs at the start of any process
    with that directory on PYTHONPATH (the real CLI included); returns that environment variable."""
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(source)
    return {"PYTHONPATH": str(directory)}
