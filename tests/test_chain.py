"""`atlas-distill chain`: validation before any weights load, a real 2-stage chain, resume."""

from __future__ import annotations

import json
import shutil

import pytest

from atlas_distill.chain import default_chain_name, parse_chain, split_stage_overrides
from atlas_distill.errors import ModelSpecError, UsageError

STAGE = ["trainer.max_new_tokens=4", "trainer.eval_max_sessions=2", "trainer.report_to=[]", "data.prompt=task",
         "trainer.max_length=192", "trainer.per_device_train_batch_size=2", "trainer.save_steps=1"]


def test_spec_parsing_and_errors():
    specs = parse_chain("14b:7b:3b:1.5b", "Qwen/Qwen2.5-{size}-Instruct")
    assert [s.source for s in specs] == ["Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-7B-Instruct",
                                         "Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"]
    assert [s.name for s in parse_chain("smollm2-135m:smollm2-135m@15L", "F/{size}")] == [
        "smollm2-135m", "smollm2-135m@15L"]
    for bad in ("7b", "", "7b::3b", ":7b"):
        with pytest.raises(UsageError, match="at least two model specs"):
            parse_chain(bad, "F/{size}")
    with pytest.raises(ModelSpecError, match="chain model 2 of 3: model spec `nonsense`"):
        parse_chain("7b:nonsense:3b", "F/{size}")
    common, per_stage = split_stage_overrides(["trainer.beta=0.3", "stage2.trainer.learning_rate=1e-5"], 3)
    assert common == ["trainer.beta=0.3"] and per_stage == {1: [], 2: ["trainer.learning_rate=1e-5"], 3: []}
    assert default_chain_name("14b:7b") == "14b_to_7b"


def test_incompatible_tokenizers_fail_before_any_weights_load(cli, make_tiny_model, tmp_path):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(tok_models.WordLevel({"<unk>": 0, "</s>": 1, "hi": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    other = tmp_path / "other"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(other)
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))  # no weights
    result = cli("chain", f"{make_tiny_model(seed=2)}:{make_tiny_model(seed=1)}:{other}", "--dry-run")
    assert result.code == 1
    assert "chain stage 2" in result.stderr and "different tokenizers" in result.stderr


def test_dry_run_prints_the_plan_and_writes_nothing(cli, make_tiny_model, tmp_path):
    spec = f"{make_tiny_model(seed=2)}:{make_tiny_model(seed=1)}:{make_tiny_model(layers=1, seed=3)}"
    result = cli("chain", spec, "--dry-run", "--json", "--name", "plan", "stage2.trainer.learning_rate=1e-5")
    assert result.code == 0, result.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/chain/plan/: a dry run checks, and writes nothing
    text = cli("chain", spec, "--dry-run", "--name", "plan", env={"COLUMNS": "80"}).stdout
    assert "…" not in text and "stage-1-" in text and "stage-2-" in text  # whole, at 80 columns too
    assert "Outputs go under the chain directory outputs/chain/plan" in text
    plan = result.json()
    assert [s["stage"] for s in plan["stages"]] == [1, 2]
    assert plan["stages"][1]["teacher"] == "stage 1 final"
    assert plan["stages"][1]["overrides"] == ["trainer.learning_rate=1e-5"]


@pytest.mark.slow
def test_two_stage_chain_runs_and_resumes(cli, make_tiny_model, trace_file, tmp_path):
    spec = f"{make_tiny_model(seed=2)}:{make_tiny_model(seed=1)}:{make_tiny_model(layers=1, seed=3)}"
    args = ["chain", spec, "--name", "tiny", "--traces", str(trace_file), "--max-steps", "2", *STAGE,
            "stage2.trainer.learning_rate=1e-3", "--json"]
    first = cli(*args)
    assert first.code == 0, first.stderr
    summary = first.json()
    root = tmp_path / "outputs/chain/tiny"
    assert summary == json.loads((root / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == [1, 2] and not any(r["skipped"] for r in summary["stages"])
    stage1, stage2 = (root / r["run_dir"].split("outputs/chain/tiny/")[1] for r in summary["stages"])
    assert (stage1 / "final/config.json").is_file() and (stage2 / "final/config.json").is_file()
    # stage 2 was taught by stage 1's final checkpoint, with its own learning rate
    stage2_profile = (stage2 / "profile.yaml").read_text()
    assert str(stage1 / "final").split("outputs/")[1] in stage2_profile and "learning_rate: 0.001" in stage2_profile
    assert summary["stages"][1]["student_parameters"] < summary["stages"][0]["student_parameters"]

    stage1_mtime = (stage1 / "summary.json").stat().st_mtime
    shutil.rmtree(stage2 / "final")  # as if the chain died while finishing stage 2
    again = cli(*args)
    assert again.code == 0, again.stderr
    rows = again.json()["stages"]
    assert [r["skipped"] for r in rows] == [True, False]
    assert "already complete; skipped" in again.stderr and "resuming from its last checkpoint" in again.stderr
    assert (stage1 / "summary.json").stat().st_mtime == stage1_mtime and (stage2 / "final/config.json").is_file()
    assert json.loads((stage2 / "summary.json").read_text())["steps"] == 2


def test_a_failing_stage_is_named_and_earlier_stages_kept(cli, make_tiny_model, trace_file, tmp_path):
    """Stage 2 finds no data (its own override filters everything out); stage 1's outputs stay whole."""
    from atlas_distill.runs.layout import RunDir

    spec = f"{make_tiny_model(seed=2)}:{make_tiny_model(seed=1)}:{make_tiny_model(layers=1, seed=3)}"
    result = cli("chain", spec, "--name", "broken", "--traces", str(trace_file), "--max-steps", "1",
                 "stage2.trainer.learning_key=missing", *STAGE)
    assert result.code == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "Chain stage 2 failed" in message and "No conversations found" in message
    assert "Earlier stages' outputs are kept" in message
    (stage1,) = (tmp_path / "outputs/chain/broken").glob("stage-*")  # stage 2 never started: no directory
    assert stage1.name.startswith("stage-1-")
    assert RunDir(stage1).finished_summary() is not None and (stage1 / "final/model.safetensors").is_file()


def test_an_unreachable_hub_is_found_once_quickly_and_said_in_one_line(cli, tmp_path):
    """A chain of hub models on a machine without the hub: huggingface_hub retried each file five times (about
    50 s of `Retrying in 8s` lines) before the offline error. A closed port stands in for the unreachable hub;
    HF_HUB_OFFLINE is unset, as on a user's machine."""
    (tmp_path / "t.jsonl").write_text('{"task": "x"}\n')
    result = cli("chain", "14b:7b:3b:1.5b", "--traces", "t.jsonl",
                 env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.code == 1, result.stderr
    assert result.stderr.count("the model hub (http://127.0.0.1:9) is unreachable") == 1, result.stderr
    assert "Retrying" not in result.stderr and "cannot load model `Qwen/Qwen2.5-14B-Instruct`" in result.stderr
    assert "This machine may be offline" in result.stderr


def test_the_documented_qwen_chain_plans_offline_from_what_the_tool_knows(cli, tmp_path):
    """The README's `chain 14b:7b:3b:1.5b --dry-run` on a machine with neither the hub nor the models: the plan,
    with each model's size from the family's shipped config numbers, and a note that the tokenizer check runs
    when the models are present. The sizes are the models' published ones (14.7B, 7.61B, 3.09B, 1.54B)."""
    result = cli("chain", "14b:7b:3b:1.5b", "--dry-run", "--json")
    assert result.code == 0, result.stderr
    plan = result.json()
    sizes = [(s["teacher_parameters"], s["student_parameters"]) for s in plan["stages"]]
    assert sizes == [(14_770_033_664, 7_615_616_512), (7_615_616_512, 3_085_938_688), (3_085_938_688, 1_543_714_304)]
    (note,) = plan["notes"]
    assert "the Qwen2.5 family shares one tokenizer (151,665 tokens" in note and "when the chain starts" in note
    text = cli("chain", "14b:7b:3b:1.5b", "--dry-run")
    assert "Qwen2.5-14B-Instruct (14.77B)" in text.stdout and "Note: the models are not on this machine" in text.stderr
    assert list(tmp_path.iterdir()) == []
    mixed = cli("chain", "14b:smollm2-135m", "--dry-run")  # not one known family: the check cannot be skipped
    assert mixed.code == 1 and "cannot load model" in mixed.stderr

