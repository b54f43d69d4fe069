"""Multi-turn distillation: a session's every action is a target, masked by token spans, chosen for on-policy
by a seeded draw, and judged per step and per episode."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas_distill.data import conversation_row, prepare_conversations
from atlas_distill.evaluate import EvalResult, Episode, evaluate_conversations, generate_answers, turn_prompts
from atlas_distill.gkd.collator import TargetSpanCollator
from atlas_distill.target_spans import encode_to_fit
from atlas_distill.traces import AtlasSession
from atlas_distill.traces.conversation import session_to_conversation

TASK = "Add the contact from the note.\nNote: Met Ana Silva (ana@acme.example.com) at the expo."
SEARCH = {"email": "ana@acme.example.com"}
CREATE = {"company": "Acme", "email": "ana@acme.example.com", "name": "Ana Silva"}
CALL_SEARCH = '{"arguments": {"email": "ana@acme.example.com"}, "tool": "crm.search_contacts"}'
CALL_CREATE = ('{"arguments": {"company": "Acme", "email": "ana@acme.example.com", "name": "Ana Silva"}, '
               '"tool": "crm.create_contact"}')
PLAN = {"steps": [{"id": 1, "description": "Search the contact"}, {"id": 2, "description": "Create the contact"},
                  {"id": 3, "description": "Rate the lead"}]}
EXPECTED = [
    {"role": "system", "content": f"Task: {TASK}\nPlan:\n1. Search the contact\n2. Create the contact\n"
                                  "3. Rate the lead"},
    {"role": "user", "content": "Search the contact"},
    {"role": "assistant", "content": CALL_SEARCH},
    {"role": "tool", "content": '{"matches": 0}'},
    {"role": "user", "content": "Create the contact\n\nTeacher guidance: Copy the email exactly."},
    {"role": "assistant", "content": CALL_CREATE},
    {"role": "tool", "content": '{"contact_id": "C-1"}'},
    {"role": "user", "content": "Rate the lead"},
    {"role": "assistant", "content": "hot"},
    {"role": "user", "content": "Give your final answer."},
    {"role": "assistant", "content": "Created C-1."},
]


def _event(kind, actor, *, name="student.llm", inp=None, out=None):
    return {"id": 1, "event": {"payload": {"event_type": kind, "name": name, "metadata": {"actor": actor},
                                           "data": {"input": inp, "output": out}}}}


def _events():
    return [_event("WORKFLOW_START", "system", inp=TASK),
            _event("LLM_START", "student", inp="Search the contact"),
            _event("LLM_END", "student", out=CALL_SEARCH),  # the model's message carrying the call: kept once
            _event("TOOL_START", "student", name="crm.search_contacts", inp=SEARCH),
            _event("TOOL_END", "student", name="crm.search_contacts", out={"matches": 0}),
            _event("LLM_START", "student", inp="Create the contact"),
            _event("CUSTOM_END", "teacher", name="teacher.guidance", out="Copy the email exactly."),
            _event("LLM_END", "student", out="I will call the create tool now."),  # replaced by the call itself
            _event("TOOL_START", "student", name="crm.create_contact", inp=CREATE),
            _event("TOOL_END", "student", name="crm.create_contact", out={"contact_id": "C-1"}),
            _event("LLM_START", "student", inp="Rate the lead"),
            _event("LLM_END", "student", out="hot"),
            _event("WORKFLOW_END", "system", out="Created C-1.")]


def _export_steps():
    return [{"step_id": 1, "description": "Search the contact", "tool": "crm.search_contacts",
             "tool_params": SEARCH, "output": '{"matches": 0}', "guidance": []},
            {"step_id": 2, "description": "Create the contact", "tool": "crm.create_contact", "tool_params": CREATE,
             "output": '{"contact_id": "C-1"}', "guidance": ["Copy the email exactly."]},
            {"step_id": 3, "description": "Rate the lead", "tool": None, "tool_params": {}, "output": "hot",
             "guidance": None}]


def _capture_steps():
    """The SDK's own SessionTrajectory shape: description and tool under `step`."""
    return [{"step": {"id": s["step_id"], "description": s["description"], "tool": s["tool"],
                      "tool_params": s["tool_params"], "depends_on": []},
             "trace": "", "output": s["output"], "guidance": s["guidance"] or [], "prior_results": {},
             "status": "ok", "validation": {"valid": True}} for s in _export_steps()]


def session(**extra) -> AtlasSession:
    return AtlasSession.from_json({"task": TASK, "final_answer": "Created C-1.", "plan": PLAN,
                                   "session_metadata": {"session_id": 5}, **extra})


@pytest.mark.parametrize("shape", ["events", "export steps", "sdk capture steps"])
def test_a_session_becomes_its_actions_as_targets_and_its_observations_as_inputs(shape):
    extra = {"events": {"trajectory_events": _events(), "steps": [{"step_id": 1, "output": "ignored"}]},
             "export steps": {"steps": _export_steps()},
             "sdk capture steps": {"steps": _capture_steps()}}[shape]
    conversation = session_to_conversation(session(**extra))
    assert conversation.messages == EXPECTED
    assert conversation.targets == [2, 5, 8, 10]
    # guidance is never something the student learns to write
    assert all("guidance" not in conversation.messages[t]["content"].lower() for t in conversation.targets)


def test_rows_say_where_their_targets_are_and_final_rows_are_unchanged():
    s = session(trajectory_events=_events())
    row = conversation_row(s, targets="all")
    assert row["targets"] == [2, 5, 8, 10] and row["messages"] == EXPECTED
    final = conversation_row(s, targets="final")
    # pinned from the code before multi-turn targets existed (commit 339ba5d), byte for byte
    assert json.dumps(final, sort_keys=True) == (
        '{"learning_key": null, "messages": [{"content": "Task: Add the contact from the note.\\nNote: Me'
        't Ana Silva (ana@acme.example.com) at the expo.\\nPlan:\\n1. Search the contact\\n2. Create the co'
        'ntact\\n3. Rate the lead", "role": "system"}, {"content": "Search the contact", "role": "user"},'
        ' {"content": "{\\"arguments\\": {\\"email\\": \\"ana@acme.example.com\\"}, \\"tool\\": \\"crm.search_con'
        'tacts\\"}", "role": "assistant"}, {"content": "Tool crm.search_contacts returned: {\\"matches\\": '
        '0}\\n\\nCreate the contact", "role": "user"}, {"content": "Guidance: Copy the email exactly.\\n\\nI'
        ' will call the create tool now.", "role": "assistant"}, {"content": "Tool crm.create_contact re'
        'turned: {\\"contact_id\\": \\"C-1\\"}\\n\\nRate the lead", "role": "user"}, {"content": "hot", "role"'
        ': "assistant"}, {"content": "Give your final answer.", "role": "user"}, {"content": "Created C-'
        '1.", "role": "assistant"}], "reference": "Created C-1.", "reward": null, "session_id": "5"}')


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_the_loss_mask_covers_exactly_the_target_turns(tokenizer):
    conversation = session_to_conversation(session(trajectory_events=_events()))
    batch = TargetSpanCollator(tokenizer, 1024)([{"messages": conversation.messages,
                                                  "targets": conversation.targets}])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    learnt = tokenizer.decode(ids[labels != -100])
    # each target's text and its end of turn, nothing else: no tool result, guidance, task or step description
    assert learnt == "".join(f"{EXPECTED[t]['content']}<|im_end|>\n" for t in (2, 5, 8, 10))
    assert torch.equal(labels[labels != -100], ids[labels != -100])
    # SmolLM2's template has no tool role: results go in as user turns, between the actions
    text = tokenizer.decode(ids)
    assert '<|im_start|>user\nTool result: {"matches": 0}\n\nCreate the contact' in text


def test_a_final_only_row_collates_as_trls_chatml_collator(tokenizer):
    from trl.experimental.utils import DataCollatorForChatML

    rows = [{"messages": conversation_row(session(trajectory_events=_events()), targets="final")["messages"]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 2+2?"},
                          {"role": "assistant", "content": "4"}]}]
    ours, trl = TargetSpanCollator(tokenizer, 512)(rows), DataCollatorForChatML(tokenizer=tokenizer, max_length=512)(rows)
    for key in ("input_ids", "attention_mask", "labels", "prompts", "prompt_attention_mask"):
        assert torch.equal(ours[key], trl[key]), key


def test_over_long_conversations_lose_whole_turns_from_the_left(tokenizer):
    conversation = session_to_conversation(session(trajectory_events=_events()))
    whole = encode_to_fit(tokenizer, conversation.messages, conversation.targets, None)
    fitted = encode_to_fit(tokenizer, conversation.messages, conversation.targets, len(whole.ids) - 10)
    assert fitted.cut_turns == 3 and fitted.cut_tokens == 0 and len(fitted.ids) <= len(whole.ids) - 10
    assert fitted.messages[0] == EXPECTED[0] and fitted.messages[1]["content"].startswith("Create the contact")
    assert [fitted.messages[t]["content"] for t in fitted.targets] == [CALL_CREATE, "hot", "Created C-1."]


def test_rows_count_targets_and_drop_one_that_alone_does_not_fit(tokenizer):
    long_action = {"step_id": 1, "description": "Write", "tool": None, "output": "word " * 200}
    sessions = [session(trajectory_events=_events()),
                AtlasSession.from_json({"task": "t", "final_answer": "done", "steps": [long_action],
                                        "session_metadata": {"session_id": 6}})]
    prepared = prepare_conversations(sessions, source="x", eval_split=0.0, tokenizer=tokenizer, max_length=128)
    stats = prepared.stats
    assert (stats.train, stats.targets, stats.dropped_targets, stats.truncated) == (2, 5, 1, 2)
    by_id = {row["session_id"]: row for row in prepared.train}
    assert by_id["6"]["targets"] == [len(by_id["6"]["messages"]) - 1]  # the final answer stays


def test_the_on_policy_turn_is_seeded_uniform_and_its_prompt_is_the_recorded_prefix(tokenizer):
    conversation = session_to_conversation(session(trajectory_events=_events()))
    row = {"messages": conversation.messages, "targets": conversation.targets}

    def draws(seed, n=120):
        collate = TargetSpanCollator(tokenizer, 1024, seed=seed)
        return [collate([row])["target_span"].item() for _ in range(n)]

    first = draws(7)
    assert first == draws(7) and first != draws(8)
    counts = [first.count(i) for i in range(4)]
    assert min(counts) >= 15, counts  # uniform over 4 targets: each about 30 of 120
    batch = TargetSpanCollator(tokenizer, 1024, seed=7)([row])
    prompt = tokenizer.decode(batch["prompts"][0][batch["prompt_attention_mask"][0].bool()])
    chosen = conversation.targets[first[0]]
    from atlas_distill.target_spans import chat_messages

    mapped, _ = chat_messages(conversation.messages, conversation.targets, tool_role=False)
    index = [2, 4, 6, 8][first[0]]  # the targets' places once tool results are user turns
    assert mapped[index]["content"] == conversation.messages[chosen]["content"]
    assert prompt == tokenizer.apply_chat_template(mapped[:index], tokenize=False, add_generation_prompt=True)


def test_step_and_episode_success_from_crafted_turns(make_tiny_model, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(seed=4)).eval()
    messages = [{"role": "system", "content": "Agent."}, {"role": "user", "content": "Step one"},
                {"role": "assistant", "content": "?"}, {"role": "user", "content": "Step two"},
                {"role": "assistant", "content": "?"}, {"role": "user", "content": "Answer"},
                {"role": "assistant", "content": "?"}]
    # Record what the model itself says at turn 1, a wrong turn 2, then its own final answer: 2 of 3 steps right.
    for index, right in ((2, True), (4, False), (6, True)):
        said = generate_answers(model, tokenizer, [messages[: index + 1]], max_new_tokens=5)[0].text
        messages[index] = {"role": "assistant", "content": said if right else said + " (not this)"}
    good = [dict(m) for m in messages]
    good[4] = {"role": "assistant", "content": generate_answers(model, tokenizer, [good[:5]], max_new_tokens=5)[0].text}
    result = evaluate_conversations(model, tokenizer, [messages, good], [messages[6]["content"], good[6]["content"]],
                                    targets=[[2, 4, 6], [2, 4, 6]], scorer="exact", max_new_tokens=5, batch_size=4)
    assert [e.steps for e in result.episodes][0] == [True, False, True]
    assert result.episodes[1].steps[1] is True
    assert result.success_rate == 1.0 and result.step_success_rate == pytest.approx((2 + result.episodes[1].steps.count(True)) / 6)
    assert result.episode_success_rate == (0.5 if all(result.episodes[1].steps) else 0.0)
    assert len(turn_prompts(tokenizer, messages, [2, 4, 6])) == 3


def test_rates_aggregate_steps_and_episodes():
    episodes = [Episode("a", "a", True, 10, [True, True, True]), Episode("b", "a", False, 7, [True, False]),
                Episode("c", "c", True, 5, [False, True])]
    result = EvalResult.of(episodes)
    assert result.success_rate == pytest.approx(2 / 3)
    assert result.step_success_rate == pytest.approx(5 / 7)
    assert result.episode_success_rate == pytest.approx(1 / 3)
    assert result.avg_tokens == pytest.approx(22 / 3)


def test_one_off_policy_pass_over_all_targets_equals_the_naive_expansion(tmp_path, make_tiny_model, tokenizer):
    """The loss of one conversation with every target span equals, token for token, the loss of one row per target
    (the conversation through that turn, that turn its only target): the prefixes are the same."""
    from datasets import Dataset

    from atlas_distill.gkd import AtlasGKDTrainer, GKDConfig

    conversation = session_to_conversation(session(trajectory_events=_events()))
    whole = {"messages": conversation.messages, "targets": conversation.targets, "reference": "Created C-1."}
    naive = [{"messages": conversation.messages[: t + 1], "targets": [t], "reference": "x"}
             for t in conversation.targets]
    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=1, report_to=[],
                     use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=1024, bf16=False, lmbda=0.0,
                     beta=0.3, teacher_cache_topk=0)
    trainer = AtlasGKDTrainer(model=AutoModelForCausalLM.from_pretrained(make_tiny_model(seed=1)),
                              teacher_model=AutoModelForCausalLM.from_pretrained(make_tiny_model(seed=2)),
                              args=args, train_dataset=Dataset.from_list([whole]), processing_class=tokenizer)

    def loss_and_tokens(row):
        batch = trainer.data_collator([row])
        return trainer.compute_loss(trainer.model, batch).item(), int((batch["labels"] != -100).sum())

    one_pass, tokens = loss_and_tokens(whole)
    parts = [loss_and_tokens(row) for row in naive]
    assert tokens == sum(n for _, n in parts)
    assert one_pass == pytest.approx(sum(loss * n for loss, n in parts) / tokens, rel=1e-4)


def test_the_teacher_cache_key_includes_the_target_spans(tokenizer):
    from atlas_distill.gkd.teacher_cache import TeacherCache

    conversation = session_to_conversation(session(trajectory_events=_events()))
    collate = TargetSpanCollator(tokenizer, 1024)
    every = collate([{"messages": conversation.messages, "targets": conversation.targets}])
    last = collate([{"messages": conversation.messages, "targets": conversation.targets[-1:]}])
    assert torch.equal(every["input_ids"], last["input_ids"])  # same tokens, other targets
    keys = [TeacherCache.keys(batch, batch["labels"][:, 1:] != -100) for batch in (every, last)]
    assert keys[0] != keys[1]


def test_a_template_that_rewrites_earlier_turns_is_a_clear_error(tiny_tokenizer_dir):
    from atlas_distill.errors import ModelSpecError

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # marks the last turn: a turn renders differently once another follows it
    tokenizer.chat_template = "{% for m in messages %}{% if loop.last %}>{% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ModelSpecError) as caught:
        prepare_conversations([session(trajectory_events=_events())], source="x", tokenizer=tokenizer, max_length=512)
    assert "data.targets=final" in caught.value.fix


def test_parallel_tool_calls_stay_separate_actions_and_a_step_keeps_its_text():
    events = [_event("LLM_START", "student", inp="Look both up"),
              _event("LLM_END", "student", out="calling a and b"),  # the message that carries the calls
              _event("TOOL_START", "student", name="a", inp={"q": 1}), _event("TOOL_START", "student", name="b", inp={}),
              _event("TOOL_END", "student", name="a", out="ra"), _event("TOOL_END", "student", name="b", out="rb"),
              _event("LLM_START", "student", inp="Summarise"), _event("LLM_END", "student", out="summary"),
              _event("LLM_START", "student", inp="Call c"), _event("TOOL_START", "student", name="c", inp={})]
    conversation = session_to_conversation(session(trajectory_events=events))
    actions = [conversation.messages[t]["content"] for t in conversation.targets]
    assert actions == ['{"arguments": {"q": 1}, "tool": "a"}', '{"arguments": {}, "tool": "b"}', "summary",
                       '{"arguments": {}, "tool": "c"}', "Created C-1."]
    assert [m["content"] for m in conversation.messages if m["role"] == "tool"] == ["ra", "rb"]


def test_a_long_last_exchange_keeps_its_tail_and_draws_only_targets_with_a_prompt(tokenizer):
    """One user turn, then many actions and results: no whole turn can go, so tokens are cut from the left; a
    target cut at its start is still learnt but never drawn as the on-policy turn."""
    messages = [{"role": "system", "content": "Agent."}, {"role": "user", "content": "Do it all."}]
    for n in range(6):
        messages += [{"role": "assistant", "content": f"action number {n} with some words"},
                     {"role": "tool", "content": f"result {n}"}]
    messages.append({"role": "assistant", "content": "done"})
    targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    collate = TargetSpanCollator(tokenizer, 44, seed=0)
    for _ in range(20):
        batch = collate([{"messages": messages, "targets": targets}])
        assert batch["input_ids"].shape[1] == 44 and batch["prompts"].shape[1] > 0
    encoded = encode_to_fit(tokenizer, messages, targets, 44)
    assert encoded.cut_tokens > 0 and encoded.spans[0][0] == 0  # the first kept target lost its start
    assert tokenizer.decode(encoded.ids[encoded.spans[-1][0]:encoded.spans[-1][1]]) == "done<|im_end|>\n"


def test_a_template_with_a_tool_role_gets_tool_turns_and_one_without_gets_user_turns(tiny_tokenizer_dir):
    from atlas_distill.target_spans import supports_tool_role

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert supports_tool_role(tokenizer) is False  # SmolLM2's template does not name the role
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}<tool>{{ m['content'] }}</tool>\n"
                               "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    assert supports_tool_role(tokenizer) is True
    conversation = session_to_conversation(session(trajectory_events=_events()))
    encoded = encode_to_fit(tokenizer, conversation.messages, conversation.targets, None)
    assert encoded.messages == conversation.messages  # tool turns kept as such
    text = tokenizer.decode(encoded.ids)
    assert '<tool>{"matches": 0}</tool>' in text and "Tool result:" not in text
    # the template writes "assistant: " before a turn; the space merges into the turn's first token
    assert [tokenizer.decode(encoded.ids[s:e]) for s, e in encoded.spans] == [
        f" {EXPECTED[t]['content']}\n" for t in conversation.targets]
