"""`atlas-distill train` through the real console script, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import startup_hook


FAST = ["--max-steps", "3", "trainer.max_new_tokens=6", "trainer.eval_steps=2", "trainer.eval_max_sessions=5",
        "trainer.per_device_train_batch_size=2", "trainer.logging_steps=1", "trainer.max_length=192",
        "data.prompt=task", "trainer.report_to=[]", "trainer.learning_rate=1e-2"]


def models(make_tiny_model):
    return ["--teacher", str(make_tiny_model(seed=2)), "--student", str(make_tiny_model(seed=1))]


def test_short_train_writes_checkpoint_summary_and_metrics(cli, make_tiny_model, trace_file, tmp_path):
    result = cli("train", *models(make_tiny_model), "--traces", str(trace_file), "--run-name", "tiny", *FAST,
                 "trainer.report_to=[wandb]", "--json",
                 env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb")})
    assert result.code == 0, result.stderr
    summary = result.json()
    run = tmp_path / "outputs/gkd/tiny"
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["eval_used"] == 5
    assert 0 < summary["eval"]["avg_tokens"] <= 6
    b = summary["baseline"]
    assert b["baseline_success"] == summary["student_before"]["success_rate"]  # auto: measured before training
    assert b["success_delta"] == pytest.approx(summary["eval"]["success_rate"] - b["baseline_success"])
    for line in ("Loaded datasets: train=", "Starting GKD training with Baseline Comparison reference: success=",
                 "AtlasGKDTrainer initialized with lmbda=1.0, beta=0.5", "Baseline Comparison targets"):
        assert line in result.stderr
    # evaluations at steps 2 and 3 each say it once; the run's closing line does not repeat step 3's
    assert result.stderr.count("Baseline Comparison targets") == 2
    order = [result.stderr.index(line) for line in ("Loaded datasets", "Starting GKD training", "AtlasGKDTrainer init")]
    assert order == sorted(order)  # upstream's order
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*records)
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/success_rate", "eval/avg_tokens",
            "metrics/success_delta", "metrics/token_reduction_pct", "metrics/meets_target"} <= keys
    # the summary reports the last evaluation's figures (that success moves at all: tests/test_learning.py)
    last = [r for r in records if "eval/success_rate" in r][-1]
    assert last["step"] == 3 and (summary["eval"]["success_rate"], summary["eval"]["avg_tokens"]) == (
        last["eval/success_rate"], last["eval/avg_tokens"])
    assert (run / "checkpoint-3").is_dir() and (run / "profile.yaml").is_file()
    assert (run / "final/profile.yaml").read_text() == (run / "profile.yaml").read_text()  # final/ travels whole
    assert "eval/success_rate" in (run / "final/README.md").read_text()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run / "final")
    AutoTokenizer.from_pretrained(run / "final")
    before = load_file(make_tiny_model(seed=1) / "model.safetensors")
    after = load_file(run / "final/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*")), "W&B wrote an offline run"


def test_multi_turn_train_learns_every_action_and_reports_step_and_episode_success(cli, make_tiny_model,
                                                                                trace_file, tmp_path):
    fast = [a for a in FAST if a not in ("data.prompt=task", "trainer.max_length=192")]
    result = cli("train", *models(make_tiny_model), "--traces", str(trace_file), "--run-name", "agent", *fast,
                 "trainer.max_length=512", "trainer.eval_max_sessions=3", "--json")
    assert result.code == 0, result.stderr
    summary = result.json()
    data = summary["data"]
    # every session has at least its two tool calls and its final answer as targets
    assert data["targets"] >= 3 * (data["train"] + data["eval"]) and data["dropped_targets"] == 0
    run = tmp_path / "outputs/gkd/agent"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/step_success_rate" in r]
    assert evals and all("eval/episode_success_rate" in r and "eval/success_rate" in r for r in evals)
    for figures in (summary["eval"], summary["teacher_eval"], summary["student_before"]):
        rates = (figures["success_rate"], figures["step_success_rate"], figures["episode_success_rate"])
        assert all(0.0 <= rate <= 1.0 for rate in rates)
        assert figures["episode_success_rate"] <= min(figures["success_rate"], figures["step_success_rate"])
        assert figures["avg_tokens"] > 6  # tokens per episode: several turns of up to 6 tokens each
    assert summary["eval"]["episode_success_rate"] == evals[-1]["eval/episode_success_rate"]
    card = (run / "final/README.md").read_text()
    assert "eval/step_success_rate" in card and "eval/episode_success_rate" in card


def test_postgres_and_file_training_use_the_same_sessions(cli, make_tiny_model, seeded_db, trace_file, tmp_path):
    args = [*models(make_tiny_model), "--max-steps", "1", "trainer.max_new_tokens=2", "trainer.eval_max_sessions=100",
            "trainer.report_to=[]", "data.prompt=task", "trainer.max_length=192", "--min-reward", "0.6", "--json"]
    from_db = cli("train", *args, "--database-url", seeded_db, "--run-name", "db")
    from_file = cli("train", *args, "--traces", str(trace_file), "--run-name", "file")
    assert from_db.code == 0 and from_file.code == 0, from_db.stderr + from_file.stderr
    db, file = from_db.json()["data"], from_file.json()["data"]
    assert (db["train"], db["eval"]) == (file["train"], file["eval"]) and db["train"] > 50
    assert db["eval_used"] == db["eval"] > 0  # every eval session was evaluated, and its id recorded:
    evaluated = [json.loads((tmp_path / f"outputs/gkd/{name}/before_training.json").read_text())["key"]["sessions"]
                 for name in ("db", "file")]
    assert evaluated[0] == evaluated[1] and len(evaluated[0]) == db["eval"]


def test_no_data_errors_show_the_funnel_and_name_only_flags_and_keys_each_command_has(
        cli, make_tiny_model, trace_file, seeded_db, tmp_path):
    """Every command that reads sessions says which filter left none (a file gets the same per-filter funnel as
    Postgres), and its fix names only flags that command has (checked against its --help) and profile keys that
    exist (checked by `profile show`)."""
    import re

    teacher, student = str(make_tiny_model(seed=2)), str(make_tiny_model(seed=1))
    runs = {
        "train": cli("train", "--teacher", teacher, "--student", student, "--traces", str(trace_file),
                     "--learning-key", "nope"),
        "compare": cli("compare", "--model", student, "--traces", str(trace_file), "--learning-key", "nope"),
        "export": cli("export", "--database-url", seeded_db, "--learning-key", "nope"),
        "chain": cli("chain", f"{teacher}:{student}", "--traces", str(trace_file), "--learning-key", "nope"),
    }
    for command, result in runs.items():
        assert result.code == 2, (command, result.stderr)
        text = " ".join(result.stderr.split())
        assert "No conversations found" in text and "learning_key = 'nope': 0" in text, (command, text)
        assert "(the filter `learning_key = 'nope'` left none)" in text, (command, text)
        fix = text.split("Fix:")[1]
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", fix))
        assert {"--min-reward", "--include-status", "--all-statuses"} <= flags, (command, fix)
        helptext = cli(command, "--help").stdout
        for flag in flags:
            assert re.search(rf"{flag}\b", helptext), (command, flag)
        overrides = re.findall(r"\b[a-z_]+\.[a-z_.]+=[^\s,)]+", fix)
        assert "trainer.learning_key=null" in overrides, (command, fix)
        for override in overrides:
            shown = cli("profile", "show", "default", override, "--json")
            assert shown.code == 0, (command, override, shown.stderr)
    assert not (tmp_path / "outputs/gkd").exists()  # train's failed validation left no run directory
    file_funnel = " ".join(runs["train"].stderr.split())
    assert f"sessions in {trace_file}: " in file_funnel and "review_status in ['approved']: " in file_funnel
    # the review flags as every command reads them (export: no model to load)
    widened = cli("export", "--database-url", seeded_db, "--learning-key", "nope", "--include-status", "pending")
    assert "review_status in ['approved', 'pending']" in " ".join(widened.stderr.split())
    everything = cli("export", "--database-url", seeded_db, "--learning-key", "nope", "--all-statuses")
    assert everything.code == 2 and "review_status" not in everything.stderr.split("Fix:")[0]


def test_out_of_range_filters_are_errors_naming_the_closest_valid_value(cli, tmp_path):
    """A reward outside [0, 1] or a status the SDK never writes used to mean "no data" (or was ignored)."""
    cases = [
        (["--min-reward", "1.01"], "flag --min-reward: `trainer.min_reward`", "the closest valid value is 1"),
        (["trainer.min_reward=1.5"], "override `trainer.min_reward=1.5`", "the closest valid value is 1"),
        (["trainer.min_reward=-0.1"], "`trainer.min_reward`", "the closest valid value is 0"),
        (["--status", "bogus"], "flag --status: `data.status`", "succeeded, failed, running"),
        (["--status", "succeded"], "flag --status", "did you mean `succeeded`?"),
        (["--include-status", "pendng"], "flag --include-status", "did you mean `pending`?"),
        (["data.review_status=[approved,rejected]"], "`data.review_status`", "pending, approved, quarantined"),
    ]
    for command in ("train", "export", "chain", "compare"):
        for args, where, hint in cases:
            where_to = {"train": ["--traces", "x.jsonl"], "compare": ["--traces", "x.jsonl"], "chain": ["a:b"],
                        "export": ["--output", "x.jsonl"]}[command]  # x.jsonl is never read: the flags fail first
            result = cli(command, *where_to, *args)
            message = " ".join(result.stderr.split())
            assert result.code == 1, (command, args, result.stderr)
            assert where in message and hint in message, (command, args, message)
    assert list(tmp_path.iterdir()) == []  # nothing was read or written
    upper = cli("profile", "show", "default", "data.review_status=[Approved,PENDING]", "--json")
    assert upper.json()["data"]["review_status"] == ["approved", "pending"]  # as the SDK writes them


def test_a_missing_trace_file_is_named_and_no_run_directory_is_left(cli, make_tiny_model, tmp_path):
    missing = cli("train", *models(make_tiny_model), "--traces", "missing.jsonl")
    assert missing.code == 5 and "does not exist" in missing.stderr
    # no run started: no run directory (with a profile.yaml) is left for `compare` to trip on, nor outputs/
    assert not (tmp_path / "outputs").exists()


def test_unknown_model_spec_exit_1(cli, trace_file):
    result = cli("train", "--teacher", "not-a-model", "--traces", str(trace_file))
    assert result.code == 1 and "model spec `not-a-model`" in result.stderr and "Traceback" not in result.stderr


def test_tokenizer_mismatch_fails_before_training(cli, make_tiny_model, trace_file, tmp_path):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(tok_models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    other = tmp_path / "other"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(other)
    LlamaForCausalLM(LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    result = cli("train", "--teacher", str(other), "--student", str(make_tiny_model()), "--traces", str(trace_file),
                 "--run-name", "mismatch")
    assert result.code == 1 and "different tokenizers" in result.stderr
    assert not (tmp_path / "outputs/gkd/mismatch/checkpoint-1").exists()


def test_eight_bit_teacher_on_cpu_is_a_clear_error(cli, make_tiny_model, trace_file):
    result = cli("train", *models(make_tiny_model), "--traces", str(trace_file),
                 "teacher_model_init_kwargs.load_in_8bit=true")
    assert result.code == 7 and "CUDA" in result.stderr and "Traceback" not in result.stderr


def test_an_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(cli, make_tiny_model, trace_file,
                                                                          tmp_path):
    (tmp_path / "outputs/gkd/taken").mkdir(parents=True)
    (tmp_path / "outputs/gkd/taken/summary.json").write_text("{}")
    result = cli("train", *models(make_tiny_model), "--traces", str(trace_file), "--run-name", "taken")
    assert result.code == 1 and "already holds a run" in result.stderr and "--resume" in result.stderr
    assert (tmp_path / "outputs/gkd/taken/summary.json").read_text() == "{}"
    resumed = cli("train", *models(make_tiny_model), "--traces", str(trace_file), "--run-name", "new", "--resume")
    assert resumed.code == 1 and "holds no checkpoint" in resumed.stderr


def test_lora_student_is_merged_into_a_plain_final_checkpoint(cli, make_tiny_model, trace_file, tmp_path):
    result = cli("train", *models(make_tiny_model), "--traces", str(trace_file), "--run-name", "lora",
                 "--max-steps", "2", "trainer.max_new_tokens=4", "trainer.eval_max_sessions=2", "trainer.report_to=[]",
                 "data.prompt=task", "trainer.max_length=192", "model.lora.enabled=true", "model.lora.r=4",
                 "--database-url", "postgresql://atlas:Pw-In-Profile-9@127.0.0.1:1/atlas")
    assert result.code == 1 and "--traces and --database-url" in result.stderr  # one source only
    result = cli("train", *models(make_tiny_model), "--traces", str(trace_file), "--run-name", "lora",
                 "--max-steps", "2", "trainer.max_new_tokens=4", "trainer.eval_max_sessions=2", "trainer.report_to=[]",
                 "data.prompt=task", "trainer.max_length=192", "model.lora.enabled=true", "model.lora.r=4",
                 "trainer.learning_rate=1e-2", "trainer.save_steps=2",
                 "database.url=postgresql://atlas:Pw-In-Profile-9@127.0.0.1:1/atlas")
    assert result.code == 0, result.stderr
    final = tmp_path / "outputs/gkd/lora/final"
    assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # final/ must compute what the trained adapter on its base computes (checkpoint-2 holds that adapter)
    student = models(make_tiny_model)[3]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student),
                                        tmp_path / "outputs/gkd/lora/checkpoint-2").eval()
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    base = AutoModelForCausalLM.from_pretrained(student).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        want, got, untrained = (model(input_ids=ids).logits for model in (adapted, merged, base))
    assert (want - untrained).abs().max() > 1e-3  # the adapter learned something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    written = "".join(p.read_text(errors="ignore") for p in (tmp_path / "outputs/gkd/lora").rglob("*")
                      if p.is_file() and p.suffix in {".json", ".yaml", ".md", ".jsonl"})
    assert "Pw-In-Profile-9" not in written + result.stdout + result.stderr
    assert "postgresql://atlas:***@127.0.0.1:1/atlas" in (tmp_path / "outputs/gkd/lora/profile.yaml").read_text()


def test_memory_the_allocator_refuses_mid_training_is_exit_7_with_the_advice(cli, make_tiny_model, trace_file,
                                                                            tmp_path):
    """At step 2 the run asks torch's CPU allocator for 4 EiB (a sitecustomize on PYTHONPATH adds the request
    to the real training step): the allocator's own error must end as exit 7 with the out-of-memory advice, the
    checkpoint before it whole."""
    env = startup_hook(tmp_path / "hook",
                       "import torch\n"
                       "from atlas_distill.gkd import trainer\n"
                       "training_step = trainer.AtlasGKDTrainer.training_step\n"
                       "def greedy(self, *args, **kwargs):\n"
                       "    if self.state.global_step == 1:\n"
                       "        torch.empty(2**60)\n"
                       "    return training_step(self, *args, **kwargs)\n"
                       "trainer.AtlasGKDTrainer.training_step = greedy\n")
    result = cli("train", *models(make_tiny_model), "--traces", str(trace_file), "--run-name", "oom",
                 "--max-steps", "3", "trainer.save_steps=1", "trainer.max_new_tokens=2", "trainer.eval_max_sessions=2",
                 "trainer.report_to=[]", "data.prompt=task", "trainer.max_length=192", env=env)
    assert result.code == 7, result.stderr
    message = " ".join(result.stderr.split())
    assert "Error: Out of memory during training:" in message
    assert "DefaultCPUAllocator: can't allocate memory" in message  # the allocator's own words
    assert "Fix: Set trainer.per_device_train_batch_size=2 with trainer.gradient_accumulation_steps=8" in message
    assert "Traceback" not in result.stderr
    run = tmp_path / "outputs/gkd/oom"
    assert json.loads((run / "checkpoint-1/trainer_state.json").read_text())["global_step"] == 1
    assert not (run / "checkpoint-2").exists() and not (run / "summary.json").exists()


def test_out_of_memory_becomes_advice():
    from atlas_distill.training import _training_failure

    error = _training_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert error.exit_code == 7 and "Out of memory" in error.message
    for advice in ("per_device_train_batch_size=2", "gradient_accumulation_steps=8", "gradient_checkpointing",
                   "load_in_8bit=true", "smaller teacher"):
        assert advice in error.fix


def test_input_problems_are_reported_before_torch_is_imported(cli, tmp_path, empty_db):
    """train and chain (--dry-run too) check their inputs first: with torch made unimportable (a sitecustomize on
    PYTHONPATH), a missing or empty trace file, a bad model spec, an unreachable database and one without the
    Atlas schema are each reported as such, not as the import (or minutes later, after model preparation)."""
    env = startup_hook(tmp_path / "hook",
                       "import sys\n"
                       "class NoTorch:\n"
                       "    def find_spec(self, name, path=None, target=None):\n"
                       "        if name == 'torch':\n"
                       "            raise ImportError('torch was imported')\n"
                       "sys.meta_path.insert(0, NoTorch())\n")
    for command in (["train"], ["chain", "smollm2-135m:smollm2-135m@8L", "--dry-run"]):
        result = cli(*command, "--traces", "missing.jsonl", env=env)
        assert result.code == 5, result.stderr
        assert "Trace file missing.jsonl does not exist" in result.stderr and "torch" not in result.stderr
    (tmp_path / "empty.jsonl").write_text("# an SDK trace file's header, and no session\n\n")
    (tmp_path / "present.jsonl").write_text('{"task": "x", "final_answer": "y"}\n')
    closed = "postgresql://postgres@127.0.0.1:9/atlas"  # nothing listens on port 9
    cases = [(["train", "--traces", "empty.jsonl"], 2, "Trace file empty.jsonl is empty"),
             (["chain", "smollm2-135m:smollm2-135m@8L", "--dry-run", "--traces", "empty.jsonl"], 2, "is empty"),
             (["train", "--traces", "present.jsonl", "--student", "nosuch!!"], 1, "nosuch!!"),
             (["train", "--database-url", closed], 4, "127.0.0.1"),
             (["chain", "smollm2-135m:smollm2-135m@8L", "--dry-run", "--database-url", closed], 4, "127.0.0.1"),
             (["train", "--database-url", empty_db], 4, "does not hold the Atlas schema")]
    for args, code, message in cases:
        result = cli(*args, env=env)
        assert result.code == code and message in result.stderr, (args, result.stderr)
        assert "torch" not in result.stderr, args
    reached = cli("train", "--traces", "present.jsonl", env=env)  # the hook does stop whatever imports torch
    assert reached.code == 70 and "torch was imported" in reached.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("profile.yaml"))
