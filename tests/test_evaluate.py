"""Evaluation: scorers on crafted answers, greedy generation on a tiny model, baseline metrics by hand."""

from __future__ import annotations

import subprocess
import sys

import pytest

from atlas_distill.evaluate import (
    Episode,
    EvalResult,
    baseline_summary,
    compute_baseline_summary,
    evaluate_conversations,
    format_baseline_line,
    format_reference_line,
    generate_answers,
    resolve_scorer,
    score,
)

# ---------------------------------------------------------------- scorers


@pytest.mark.parametrize("prediction, reference, expected", [
    ("Paris", "paris", True),
    ("  The   Eiffel\nTower. ", "the eiffel tower", True),
    ("Paris.", "Paris", True),
    ("Paris..", "Paris", False),  # only one trailing period is dropped
    ("Paris, France", "Paris", False),
    ("", "Paris", False),
])
def test_exact(prediction, reference, expected):
    assert score(prediction, reference, "exact") is expected


@pytest.mark.parametrize("prediction, reference, expected", [
    ("She pays 600 + 634 = 1,234 dollars.\n#### 1,234", "#### 1234", True),
    ("The answer is $18.", "18", True),
    ("$1,200.50 in total", "1200.5", True),
    ("42.0", "42", True),
    ("It drops to -3 degrees", "-3", True),
    ("It drops to 3 degrees", "-3", False),
    ("Step 1: 5 apples, then 7 more: 12", "12", True),   # the last number
    ("#### 12\nChecking: 5 + 7 = 12, not 13", "12", True),  # `####` wins over the last number
    ("First 10, then 20", "10", False),
    ("I don't know", "7", False),
    ("0.1 + 0.2 = 0.30000000000000004", "0.3", True),    # small tolerance
    ("1000001", "1000000", False),
])
def test_numeric(prediction, reference, expected):
    assert score(prediction, reference, "numeric") is expected


TOOL = '{"tool": "search_contacts", "arguments": {"name": "Ada", "limit": 5}}'


@pytest.mark.parametrize("prediction, reference, expected", [
    ('{"b": [1, 2], "a": "x"}', '{"a": "x", "b": [1, 2]}', True),           # key order
    ('{\n  "a":   1.0\n}', '{"a":1}', True),                               # whitespace, 1 == 1.0
    ('Here it is:\n```json\n{"a": 1}\n```\nDone.', '{"a": 1}', True),       # fenced
    ('Calling now {"a": [1, {"c": null}]} as asked.', '{"a": [1, {"c": null}]}', True),  # prose around
    ('{"a": 2}', '{"a": 1}', False),                                      # wrong value
    ('{"a": true}', '{"a": 1}', False),                                   # true is not 1
    ('{"a": 1', '{"a": 1}', False),                                       # invalid JSON
    ("no json here", '{"a": 1}', False),
    ('[2, 1]', '[1, 2]', False),                                          # lists keep their order
    ('{"arguments": {"limit": 5.0, "name": "Ada"}, "tool": "search_contacts", "id": "call_1"}', TOOL, True),
    ('{"tool": "search_contacts", "arguments": "{\\"name\\": \\"Ada\\", \\"limit\\": 5}"}', TOOL, True),
    ('{"tool": "search_contacts", "arguments": {"name": "Bob", "limit": 5}}', TOOL, False),
    ('{"tool": "delete_contact", "arguments": {"name": "Ada", "limit": 5}}', TOOL, False),
])
def test_json(prediction, reference, expected):
    assert score(prediction, reference, "json") is expected


@pytest.mark.parametrize("prediction, reference, expected", [
    ("The capital is  PARIS, of course", "paris", True),
    ("The capital is Lyon", "paris", False),
    ("anything", "  ", False),  # an empty reference matches nothing
])
def test_contains(prediction, reference, expected):
    assert score(prediction, reference, "contains") is expected


@pytest.mark.parametrize("reference, scorer", [
    ('{"a": 1}', "json"),
    ("```json\n[1, 2]\n```", "json"),
    ("42", "numeric"),
    ("$1,200.50", "numeric"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "numeric"),
    ("Paris", "exact"),
    ("Meet at 10 in room 4", "exact"),
    ("See [1] for details", "exact"),
])
def test_auto_picks_scorer_from_reference(reference, scorer):
    assert resolve_scorer(reference, "auto") == scorer


def test_auto_scores_with_the_picked_scorer():
    assert score("Let me compute: 48 + 24 = 72", "#### 72") is True
    assert score('{"b": 2, "a": 1}', '{"a": 1, "b": 2}') is True
    assert score("paris.", "Paris") is True
    assert score("It is Paris", "Paris") is False


def test_unknown_scorer_names_the_valid_ones():
    with pytest.raises(ValueError, match="auto, exact, numeric, json, contains"):
        score("a", "a", "fuzzy")


def test_importing_the_module_does_not_import_torch():
    code = "import sys, atlas_distill.evaluate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- baseline comparison


def test_baseline_summary_by_hand():
    summary = compute_baseline_summary({"success_rate": 0.875, "avg_tokens": 780},
                                       baseline_success=0.75, baseline_tokens=1200)
    assert summary["success_delta"] == pytest.approx(0.125)
    assert summary["success_delta_pp"] == pytest.approx(12.5)
    assert summary["token_reduction_pct"] == pytest.approx(35.0)  # (1200 - 780) / 1200 * 100
    assert (summary["meets_success_target"], summary["meets_token_target"]) == (True, True)
    assert summary["meets_target"] is summary["meets_all_targets"] is True
    assert (summary["baseline_success"], summary["baseline_tokens"]) == (0.75, 1200.0)


@pytest.mark.parametrize("success_rate, avg_tokens, meets", [
    (0.80, 780, False),    # +5 pp: success target missed
    (0.875, 900, False),   # 25 % fewer tokens: token target missed
    (0.85, 840, True),     # exactly +10 pp and exactly 30 %: met (despite 0.85 - 0.75 < 0.1 in floats)
])
def test_missing_either_target_fails(success_rate, avg_tokens, meets):
    summary = compute_baseline_summary({"success_rate": success_rate, "avg_tokens": avg_tokens}, 0.75, 1200)
    assert summary["meets_all_targets"] is meets


@pytest.mark.parametrize("baseline_tokens", [None, 0])
def test_without_baseline_tokens_only_success_counts(baseline_tokens):
    met = compute_baseline_summary({"success_rate": 0.9, "avg_tokens": 5000}, 0.75, baseline_tokens)
    assert met["token_reduction_pct"] is None and met["meets_token_target"] is None
    assert met["meets_all_targets"] is True
    missed = compute_baseline_summary({"success_rate": 0.8, "avg_tokens": 10}, 0.75, baseline_tokens)
    assert missed["meets_all_targets"] is False


def test_targets_are_configurable():
    summary = compute_baseline_summary({"success_rate": 0.80, "avg_tokens": 1000}, 0.75, 1200,
                                       success_target=0.05, token_target=15.0)
    assert summary["meets_all_targets"] is True


def test_eval_results_in_every_accepted_shape():
    episodes = [Episode("a", "a", True, 10), Episode("b", "c", False, 30), Episode("d", "d", True, 20),
                Episode("e", "e", True, 40)]
    shapes = [
        EvalResult(success_rate=0.75, avg_tokens=25.0, count=4, episodes=episodes),
        {"eval/success_rate": 0.75, "eval/avg_tokens": 25.0},
        episodes,
        [{"success": e.success, "tokens": e.tokens} for e in episodes],
    ]
    for shape in shapes:
        summary = compute_baseline_summary(shape, baseline_success=0.5, baseline_tokens=50)
        assert (summary["success_rate"], summary["avg_tokens"]) == (0.75, 25.0)
        assert summary["token_reduction_pct"] == pytest.approx(50.0)


@pytest.mark.parametrize("eval_results, baseline_success, baseline_tokens, message", [
    ({"success_rate": 0.8, "avg_tokens": 10}, "auto", 1200, "baseline_success"),
    ({"success_rate": 0.8, "avg_tokens": 10}, 75, 1200, "baseline_success"),
    ({"success_rate": 0.8, "avg_tokens": 10}, 0.75, "auto", "baseline_tokens"),
    ([], 0.75, 1200, "empty"),
    (EvalResult(0.0, 0.0, 0), 0.75, 1200, "empty"),
    ({"loss": 0.3}, 0.75, 1200, "success_rate"),
])
def test_baseline_summary_rejects_bad_input(eval_results, baseline_success, baseline_tokens, message):
    with pytest.raises(ValueError, match=message):
        compute_baseline_summary(eval_results, baseline_success, baseline_tokens)


def test_console_lines_match_upstream():
    met = baseline_summary({"success_rate": 0.873, "avg_tokens": 777.6}, 0.75, 1200)
    assert format_baseline_line(met) == \
        "✅ Baseline Comparison targets MET: success delta=12.3 pp, token reduction=35.2%"
    missed = baseline_summary({"success_rate": 0.73, "avg_tokens": 777.6}, 0.75, 1200)
    assert format_baseline_line(missed) == \
        "❌ Baseline Comparison targets NOT met: success delta=-2.0 pp, token reduction=35.2%"
    no_tokens = baseline_summary({"success_rate": 0.873, "avg_tokens": 777.6}, 0.75, None)
    assert format_baseline_line(no_tokens) == "✅ Baseline Comparison targets MET: success delta=12.3 pp"
    assert format_reference_line(0.75, 1200) == \
        "Starting GKD training with Baseline Comparison reference: success=75.00%, tokens=1200"
    assert format_reference_line(0.6125, None) == \
        "Starting GKD training with Baseline Comparison reference: success=61.25%, tokens=n/a"
    assert format_reference_line(0.5, 412.4).endswith("success=50.00%, tokens=412.4")


# ---------------------------------------------------------------- generation on a tiny model


def _conversation(question: str, answer: str = "unused") -> list[dict]:
    return [{"role": "system", "content": "You are a helpful agent."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


CONVERSATIONS = [_conversation(q) for q in (
    "What is two plus two?",
    "Summarise the plan for migrating the CRM contacts to the new schema, in one line please.",
    "Hi",
    "Name a colour.",
)]


@pytest.fixture(scope="module")
def lively(make_tiny_model):
    """The tiny model with its matrices redrawn large: at the fixture's init (std 0.02) it repeats one
    token whatever the prompt, and then a broken padding or batch order would go unnoticed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model()

    def load():
        model = AutoModelForCausalLM.from_pretrained(path)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() == 2:
                    param.copy_(torch.randn(param.shape, generator=generator) * (0.5 if "proj" in name else 1.0))
        return model

    return load, AutoTokenizer.from_pretrained(path)


def test_generation_is_in_input_order_and_independent_of_batching(lively):
    load, tokenizer = lively
    model = load()
    one = generate_answers(model, tokenizer, CONVERSATIONS, max_new_tokens=10, batch_size=1)
    calls = []
    three = generate_answers(model, tokenizer, CONVERSATIONS, max_new_tokens=10, batch_size=3,
                             progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 4), (4, 4)]
    assert len(one) == len(CONVERSATIONS)
    assert len({g.text for g in one}) == len(CONVERSATIONS)  # answers depend on the prompt
    assert [g.text for g in three] == [g.text for g in one]
    assert all(0 < g.tokens <= 10 for g in one + three)
    # input order: each answer is the one its conversation gets alone
    for conversation, generation in zip(CONVERSATIONS, three):
        assert generate_answers(model, tokenizer, [conversation], max_new_tokens=10) == [generation]
    assert tokenizer.padding_side == "right"
    assert model.training is False


def test_generation_stops_at_the_first_eos_per_row(lively):
    import torch

    load, tokenizer = lively
    model = load()
    model.train()
    oracle = []
    for conversation in CONVERSATIONS[:2]:
        text = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=10, do_sample=False)
        oracle.append(out[0, ids["input_ids"].shape[1]:].tolist())
    stop = oracle[0][3]
    assert stop not in oracle[0][:3] and stop not in oracle[1]
    # Make that token an EOS too: the first row ends after 3 tokens (the rest of its row is padding,
    # which is the EOS id for this tokenizer), the second runs to max_new_tokens.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    first, second = generate_answers(model, tokenizer, CONVERSATIONS[:2], max_new_tokens=10, batch_size=2)
    assert first.tokens == 3
    assert first.text == tokenizer.decode(oracle[0][:3], skip_special_tokens=True).strip()
    assert second.tokens == 10
    assert second.text == tokenizer.decode(oracle[1], skip_special_tokens=True).strip()
    assert model.training is True  # train mode restored


def test_generation_through_a_peft_model(lively):
    from peft import LoraConfig, get_peft_model

    load, tokenizer = lively
    plain = generate_answers(load(), tokenizer, CONVERSATIONS, max_new_tokens=6, batch_size=2)
    # LoRA starts as the identity (B = 0), so the wrapped model answers exactly like the plain one.
    wrapped = get_peft_model(load(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert generate_answers(wrapped, tokenizer, CONVERSATIONS, max_new_tokens=6, batch_size=2) == plain


def test_evaluate_scores_generated_answers(lively):
    load, tokenizer = lively
    model = load()
    right, wrong = generate_answers(model, tokenizer, CONVERSATIONS[:2], max_new_tokens=8)
    result = evaluate_conversations(model, tokenizer, CONVERSATIONS[:2], [right.text, "certainly not this"],
                                    scorer="exact", max_new_tokens=8, batch_size=2)
    assert (result.success_rate, result.count) == (0.5, 2)
    assert result.avg_tokens == (right.tokens + wrong.tokens) / 2
    assert [e.success for e in result.episodes] == [True, False]
    assert result.episodes[0] == Episode(right.text, right.text, True, right.tokens, [True])
    # one target per conversation: a step is the final answer, an episode is its one step
    assert result.to_dict() == {"success_rate": 0.5, "step_success_rate": 0.5, "episode_success_rate": 0.5,
                                "avg_tokens": result.avg_tokens, "count": 2}
    assert len(result.to_dict(include_episodes=True)["episodes"]) == 2


def test_evaluate_rejects_bad_input_before_generating(lively):
    load, tokenizer = lively
    model = load()
    calls = []
    generate = model.generate
    model.generate = lambda *args, **kwargs: calls.append(1) or generate(*args, **kwargs)
    with pytest.raises(ValueError, match="valid scorers"):
        evaluate_conversations(model, tokenizer, CONVERSATIONS[:1], ["x"], scorer="fuzzy", max_new_tokens=4)
    with pytest.raises(ValueError, match="1 conversations but 2 references"):
        evaluate_conversations(model, tokenizer, CONVERSATIONS[:1], ["x", "y"], max_new_tokens=4)
    with pytest.raises(ValueError, match="must end with the reference assistant answer"):
        generate_answers(model, tokenizer, [CONVERSATIONS[0][:-1]], max_new_tokens=4)
    assert calls == []  # every error came before the model generated anything
    evaluate_conversations(model, tokenizer, CONVERSATIONS[:1], ["x"], max_new_tokens=2)
    assert calls  # and the same spy does see a generation


def own_answers(model, tokenizer) -> tuple[list[list[dict]], list[list[int]], set[int]]:
    """CONVERSATIONS with answers 0 and 2 replaced by what `model` itself answers greedily: its tokens up to a
    stop token (the end of turn, or one of the conversations' third greedy tokens, made EOS ids so that answers
    end early). Returns the conversations, the model's greedy tokens and the stop tokens."""
    import torch

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"] for c in CONVERSATIONS]
    with torch.no_grad():
        own = [model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist() for ids in prompts]
    model.generation_config.eos_token_id = [eos] + sorted({tokens[2] for tokens in own})
    stops = set(model.generation_config.eos_token_id)
    conversations = [list(c) for c in CONVERSATIONS]
    for i in (0, 2):
        cut = next(pos for pos, tok in enumerate(own[i]) if tok in stops)
        conversations[i][-1] = {"role": "assistant", "content": tokenizer.decode(own[i][:cut])}
    return conversations, own, stops


def counting_generate(model) -> list[int]:
    """The rows each model.generate call is given, appended to the list returned."""
    rows = []
    generate = model.generate
    model.generate = lambda *args, **kwargs: rows.append(kwargs["input_ids"].shape[0]) or generate(*args, **kwargs)
    return rows


def test_answers_the_model_itself_gives_are_verified_not_generated_with_the_same_result(lively):
    """Recorded answers that are what the model itself answers are found by one teacher-forced pass; only the
    others are generated; every Generation equals plain generation's."""
    load, tokenizer = lively
    model = load()
    conversations, own, stops = own_answers(model, tokenizer)
    plain = generate_answers(model, tokenizer, conversations, max_new_tokens=8, verify=False)
    generated = counting_generate(model)
    verified = generate_answers(model, tokenizer, conversations, max_new_tokens=8, batch_size=4)
    assert verified == plain
    assert sum(generated) == 2  # conversations 1 and 3 only
    assert [g.tokens for g in plain[::2]] == [next(p for p, t in enumerate(own[i]) if t in stops) for i in (0, 2)]
    # with the recorded answers as they were, nothing is verified and everything is generated
    generated.clear()
    assert generate_answers(model, tokenizer, CONVERSATIONS, max_new_tokens=8) == generate_answers(
        model, tokenizer, CONVERSATIONS, max_new_tokens=8, verify=False)
    assert sum(generated) == 2 * len(CONVERSATIONS)


def test_a_decoding_setting_in_generation_config_turns_verification_off(lively):
    load, tokenizer = lively
    model = load()
    conversations, _, _ = own_answers(model, tokenizer)
    model.generation_config.repetition_penalty = 1.3  # greedy decoding is no longer the plain argmax
    generated = counting_generate(model)
    generate_answers(model, tokenizer, conversations, max_new_tokens=8)
    assert sum(generated) == len(conversations)


def test_the_turns_of_an_episode_are_verified_in_one_forward_pass(lively):
    """An episode of three turns, each the model's own answer to the turns before it: the three recorded turns
    are checked in one teacher-forced pass over the whole episode (one row), and nothing is generated."""
    load, tokenizer = lively
    model = load()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [eos]
    while True:  # until every turn ends within 8 tokens: a turn that does not lends its third token as a stop
        episode, unended = [{"role": "system", "content": "You are a helpful agent."}], None
        stops = set(model.generation_config.eos_token_id)
        for question in ("What is two plus two?", "Name a colour.", "Hi"):
            episode.append({"role": "user", "content": question})
            ids = tokenizer.apply_chat_template(episode, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            tokens = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
            end = next((pos for pos, tok in enumerate(tokens) if tok in stops), None)
            if end is None:
                unended = tokens[2]
                break
            # the answer as the model wrote it (a leading space kept), so the template renders the same tokens
            episode.append({"role": "assistant", "content": tokenizer.decode(tokens[:end])})
        if unended is None:
            break
        model.generation_config.eos_token_id = model.generation_config.eos_token_id + [unended]
    turns = [episode[:end] for end in (3, 5, 7)]
    plain = generate_answers(model, tokenizer, turns, max_new_tokens=8, verify=False)
    generated = counting_generate(model)
    rows = []
    forward = model.model.forward
    model.model.forward = lambda *args, **kwargs: rows.append(kwargs["input_ids"].shape[0]) or forward(*args,
                                                                                                      **kwargs)
    assert generate_answers(model, tokenizer, turns, max_new_tokens=8) == plain
    assert generated == [] and rows == [1]
