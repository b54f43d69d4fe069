"""`train` under torchrun / accelerate launch (2 CPU processes, gloo) against one process, and the shipped
accelerate configs.

Same global batches in both runs: transformers hands the train dataloader to accelerate, which cuts the
sampler's order (the same seeded order in every process) into per-process batches of b and gives process i
batches i, i+2, ...; so at step k the two processes hold together the 2b conversations that one process
with batch 2b holds. The dataset is 20 training conversations seen once each (5 steps x 4): nothing
repeats, so the teacher cache (which keeps per-process entries for repeated examples) never answers in
either run, and every loss is computed exactly.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOSS_RTOL = 1e-5  # observed: <= 3e-7 relative (float32 all-reduce and summation order)


def run(command: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ATLAS_DB_URL", "PGPASSWORD")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Two processes; --standalone lets torchrun's own rendezvous bind a free port (no port handed over)."""
    return run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *args], cwd=cwd)


def accelerate_launch(*args: str, cwd: Path, attempts: int = 3) -> subprocess.CompletedProcess:
    """`--main_process_port 0` makes accelerate pick a free port, which it must close before torchrun binds it:
    another program can take it in between. Only that failure is retried."""
    for _ in range(attempts):
        done = run([str(BIN / "accelerate"), "launch", "--main_process_port", "0", *args], cwd=cwd)
        if done.returncode == 0 or "address already in use" not in done.stderr.lower():
            return done
    return done


def demo_session_ids(train: int, evaluation: int) -> list[int]:
    """The first `train` training and `evaluation` eval sessions of the bundled demo traces (default filters)."""
    from atlas_distill.config import load_profile
    from atlas_distill.data import split_of
    from atlas_distill.demo import DEMO_TRACES
    from atlas_distill.traces import JsonlTraceSource, TraceFilter

    profile = load_profile("default", [], {})
    sessions = list(JsonlTraceSource(str(DEMO_TRACES), TraceFilter.from_profile(profile)))
    split = {name: [s.session_id for s in sessions if split_of(s, profile.data.eval_split) == name]
             for name in ("train", "eval")}
    return split["train"][:train] + split["eval"][:evaluation]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert len(steps) == len(set(steps)), "every step is logged once"
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(cli, make_tiny_model, tmp_path):
    ids = ",".join(map(str, demo_session_ids(20, 4)))
    common = ["--teacher", str(make_tiny_model(seed=2)), "--student", str(make_tiny_model(seed=1)),
              "--max-steps", "5", "trainer.lmbda=0", "trainer.logging_steps=1", "trainer.eval_steps=100",
              "trainer.max_new_tokens=6", "trainer.max_length=192", "trainer.learning_rate=1e-2",
              "trainer.report_to=[]", "data.prompt=task", f"data.session_ids=[{ids}]", "--json",
              # fp32 teacher and no autocast: `auto` is bf16 on a CPU with native bf16 (the teacher) or AMX (the
              # student's compute), whose rounding differs with the batch's shape (batch 2 vs 4: 1.8e-5 relative for
              # the teacher, above the fp32 tolerance this test holds DDP to)
              "teacher_model_init_kwargs.dtype=float32", "model.dtype=float32"]
    one = cli("train", *common, "trainer.per_device_train_batch_size=4", "--run-name", "one")
    assert one.code == 0, one.stderr
    two = torchrun("-m", "atlas_distill.cli", "train", *common, "trainer.per_device_train_batch_size=2",
                   "--run-name", "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    summary = json.loads(two.stdout)  # exactly one JSON document: the main process's
    run_dir = tmp_path / "outputs/gkd/two"
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 5 and summary["data"]["train"] == 20
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-5"]
    assert not (run_dir / ".checkpoint-staging").exists()
    assert sorted(p.name for p in (run_dir / "checkpoint-5").glob("rng_state_*.pth")) == \
        ["rng_state_0.pth", "rng_state_1.pth"]
    assert two.stderr.count("Loaded datasets:") == 1 and two.stderr.count("Step 5: loss=") == 1

    single, double = losses(tmp_path / "outputs/gkd/one"), losses(run_dir)
    assert list(single) == list(double) == [1, 2, 3, 4, 5]
    for step in single:
        assert double[step] == pytest.approx(single[step], rel=LOSS_RTOL), step
    assert double[5] < double[1]
    reference = one.json()
    for key in ("success_rate", "avg_tokens"):  # generated on 2 + 2 sessions, gathered
        assert summary["eval"][key] == reference["eval"][key]
        assert summary["student_before"][key] == reference["student_before"][key]
    assert summary["eval"]["loss"] == pytest.approx(reference["eval"]["loss"], rel=LOSS_RTOL)


@pytest.mark.slow
def test_sharded_generation_gives_every_process_the_whole_result(make_tiny_model, tmp_path):
    """AtlasGKDTrainer.evaluate_model on 2 processes and 5 sessions (uneven shares): each process gets the same
    EvalResult as one process generating on all 5."""
    worker = tmp_path / "worker.py"
    worker.write_text(f"""
import json, sys
from datasets import Dataset
from transformers import AutoModelForCausalLM
from atlas_distill.gkd import AtlasGKDTrainer, GKDConfig
from atlas_distill.models import load_tokenizer
from atlas_distill.evaluate import evaluate_conversations

model = AutoModelForCausalLM.from_pretrained({str(make_tiny_model(seed=1))!r})
tokenizer = load_tokenizer({str(make_tiny_model(seed=1))!r})
conversations = [[{{"role": "system", "content": "Answer."}},
                  {{"role": "user", "content": f"Question {{i}}" * (i + 1)}},
                  {{"role": "assistant", "content": "x"}}] for i in range(5)]
references = ["x"] * 5
rows = Dataset.from_list([{{"messages": c, "reference": r}} for c, r in zip(conversations, references)])
args = GKDConfig(output_dir=sys.argv[1] + "/run", use_cpu=True, report_to=[], max_new_tokens=5,
                 per_device_eval_batch_size=2, scorer="exact", bf16=False)
teacher = AutoModelForCausalLM.from_pretrained({str(make_tiny_model(seed=2))!r})
trainer = AtlasGKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=rows, eval_dataset=rows,
                          processing_class=tokenizer)
accelerator = trainer.accelerator
assert accelerator.num_processes == 2
result = trainer.evaluate_model(model, conversations, references)
alone = evaluate_conversations(model, tokenizer, conversations, references, scorer="exact", max_new_tokens=5,
                               batch_size=2)
with open(sys.argv[1] + f"/rank{{accelerator.process_index}}.json", "w") as handle:
    json.dump({{"sharded": result.to_dict(include_episodes=True), "alone": alone.to_dict(include_episodes=True)}},
              handle)
""")
    done = torchrun(str(worker), str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["sharded"] == ranks[1]["sharded"] == ranks[0]["alone"]
    assert ranks[0]["sharded"]["count"] == 5


@pytest.mark.slow
def test_accelerate_launch_runs_the_module_with_the_shipped_ddp_config(make_tiny_model, tmp_path):
    done = accelerate_launch("--config_file", str(ROOT / "accelerate_configs/ddp.yaml"), "--num_processes", "2",
                             "-m", "atlas_distill.cli", "train",
                             "--teacher", str(make_tiny_model(seed=2)), "--student", str(make_tiny_model(seed=1)),
                             "--max-steps", "2", "trainer.per_device_train_batch_size=1", "trainer.max_new_tokens=4",
                             "trainer.eval_max_sessions=3", "trainer.max_length=192", "trainer.report_to=[]",
                             "data.prompt=task", "--run-name", "acc", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["processes"] == 2 and summary["steps"] == 2
    assert (tmp_path / "outputs/gkd/acc/final/model.safetensors").is_file()


@pytest.mark.parametrize("name, distributed_type, extra", [
    ("ddp", "MULTI_GPU", {}),
    ("fsdp", "FSDP", {"fsdp_config": {"fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT",
                                      "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}),
    ("deepspeed_zero3", "DEEPSPEED", {"deepspeed_config": {"zero_stage": 3, "zero3_save_16bit_model": True,
                                                           "zero3_init_flag": False}}),
])
def test_shipped_accelerate_configs_load_with_accelerates_parser(name, distributed_type, extra):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = ROOT / "accelerate_configs" / f"{name}.yaml"
    config = load_config_from_file(str(path))  # raises on a key accelerate does not know
    written = yaml.safe_load(path.read_text())
    loaded = copy.deepcopy(config).to_dict()  # to_dict rewrites the config in place
    assert {key: loaded[key] for key in written} == written  # every key read back as written
    assert config.distributed_type == DistributedType[distributed_type]
    assert config.num_machines == 1 and config.num_processes >= 2 and not config.use_cpu
    assert config.mixed_precision == "no"  # the profile's model.dtype decides
    for section, expected in extra.items():
        assert expected.items() <= getattr(config, section).items()


def test_readme_shows_how_to_launch_each_shipped_config():
    readme = (ROOT / "README.md").read_text()
    for name in ("ddp", "fsdp", "deepspeed_zero3"):
        assert f"accelerate launch --config_file accelerate_configs/{name}.yaml -m atlas_distill.cli train" in readme
    assert "torchrun --nproc_per_node" in readme


@pytest.mark.slow
def test_an_error_under_torchrun_is_reported_once_by_the_main_process(make_tiny_model, tmp_path):
    """Both processes meet the same error (the run directory already holds a run, found by the main process and
    handed to the other): one message, one Fix:, one JSON error document; the launcher exits 1."""
    (tmp_path / "outputs/gkd/taken").mkdir(parents=True)
    (tmp_path / "outputs/gkd/taken/summary.json").write_text("{}")
    done = torchrun("-m", "atlas_distill.cli", "train", "--teacher", str(make_tiny_model(seed=2)),
                    "--student", str(make_tiny_model(seed=1)), "--run-name", "taken", "trainer.report_to=[]",
                    "--json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("already holds a run") == 1 and done.stderr.count("Fix:") == 1, done.stderr
    error = json.loads(done.stdout)  # exactly one document
    assert error["exit_code"] == 1 and error["error"]["type"] == "UsageError"
    assert not re.search(r'File ".*atlas_distill/', done.stderr)  # no traceback of ours (torchrun prints its own)
    assert (tmp_path / "outputs/gkd/taken/summary.json").read_text() == "{}"


@pytest.mark.slow
def test_an_on_policy_steps_loss_under_ddp_is_the_mean_over_both_processes_generated_tokens(make_tiny_model,
                                                                                            tmp_path):
    """Two processes, lmbda 1 (every step on-policy): each process divides its loss by the mean of both processes'
    generated completion tokens (`_loss_items`, shared as transformers shares the dataset's count), so the logged
    loss of each step is the divergence summed over both processes' completions divided by their total count, what
    one process with the global batch computes. The second process drops one completion token of its batch from
    the loss, so that the two processes' counts differ."""
    worker = tmp_path / "worker.py"
    worker.write_text(f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from atlas_distill.gkd import AtlasGKDTrainer, GKDConfig
from test_gkd_trainer import reference_divergence

student_dir, teacher_dir = {str(make_tiny_model(seed=1))!r}, {str(make_tiny_model(seed=2))!r}
rows = [{{"messages": [{{"role": "system", "content": "Answer briefly."}},
                       {{"role": "user", "content": f"What is {{i}} plus {{i}}?"}},
                       {{"role": "assistant", "content": str(2 * i)}}], "reference": str(2 * i)}} for i in range(8)]
args = GKDConfig(output_dir=sys.argv[1] + "/run", use_cpu=True, report_to=[], per_device_train_batch_size=2,
                 max_steps=2, max_new_tokens=4, logging_steps=1, save_strategy="no", disable_tqdm=True,
                 max_length=128, seed=3, bf16=False, lmbda=1.0, beta=0.5, learning_rate=0.0)
trainer = AtlasGKDTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir),
                          teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir), args=args,
                          train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(student_dir))
rank = trainer.accelerator.process_index
assert trainer.accelerator.num_processes == 2
generate, compute_loss, loss_items = trainer.generate_on_policy_outputs, trainer.compute_loss, trainer._loss_items
batches, divided_by = [], []

def generate_dropping_one(model, inputs, config):
    ids, mask, labels = generate(model, inputs, config)
    if rank == 1:  # the last completion token of the first row leaves the loss
        labels = labels.clone()
        labels[0, int((labels[0] != -100).nonzero().max())] = -100
    return ids, mask, labels

def recording_loss(model, inputs, *args, **kwargs):
    batches.append({{key: inputs[key].clone() for key in ("input_ids", "attention_mask", "labels")}})
    return compute_loss(model, inputs, *args, **kwargs)

def recording_items(inputs, num_items_in_batch):
    divided_by.append(float(loss_items(inputs, num_items_in_batch)))
    return divided_by[-1]

trainer.generate_on_policy_outputs, trainer.compute_loss = generate_dropping_one, recording_loss
trainer._loss_items = recording_items
trainer.train()
sums, counts = [], []
for inputs in batches:  # lr 0: the weights as trained on; the divergence from its definition, at T
    counts.append(int((inputs["labels"][:, 1:] != -100).sum()))
    sums.append(reference_divergence(trainer, inputs, beta=0.5) * counts[-1])  # its mean over the tokens, summed
logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
with open(sys.argv[1] + f"/rank{{rank}}.json", "w") as handle:
    json.dump({{"sums": sums, "counts": counts, "divided_by": divided_by, "logged": logged}}, handle)
""")
    done = torchrun(str(worker), str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert len(ranks[0]["counts"]) == len(ranks[1]["counts"]) == 2
    counts = [ranks[0]["counts"][k] + ranks[1]["counts"][k] for k in (0, 1)]
    assert all(a != b for a, b in zip(ranks[0]["counts"], ranks[1]["counts"]))  # the shares differ
    assert ranks[0]["divided_by"] == ranks[1]["divided_by"] == [count / 2 for count in counts]
    expected = [(ranks[0]["sums"][k] + ranks[1]["sums"][k]) / counts[k] for k in (0, 1)]
    assert ranks[0]["logged"] == ranks[1]["logged"] == pytest.approx(expected, rel=1e-4)
