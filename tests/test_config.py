"""Profiles: every shipped one loads, strict keys, overrides and flags in order."""

from __future__ import annotations

import pytest
import yaml

from atlas_distill.config import Profile, known_keys, load_profile, parse_override, profile_paths
from atlas_distill.config.loader import _flatten
from atlas_distill.errors import ProfileError


def test_every_shipped_profile_loads():
    names = dict(profile_paths())
    assert {"default", "fast", "high-quality", "task-specific"} <= set(names)
    for name, path in names.items():
        resolved = load_profile(name).model_dump()
        written = _flatten(yaml.safe_load(path.read_text()) or {})
        assert written, f"{name} lists no keys"
        for key, value in written.items():  # every key the file writes is the value the profile resolves to
            got = resolved
            for part in key.split("."):
                got = got[part]
            assert got == value, (name, key, got, value)


def test_default_profile_is_the_declared_defaults():
    assert load_profile("default") == Profile()


def test_profiles_carry_the_upstream_values():
    fast, hq, task = load_profile("fast"), load_profile("high-quality"), load_profile("task-specific")
    assert (fast.trainer.min_reward, fast.trainer.num_train_epochs) == (0.7, 1)
    assert (fast.trainer.eval_steps, fast.trainer.save_steps) == (50, 50)
    assert (hq.trainer.min_reward, hq.trainer.num_train_epochs, hq.trainer.learning_rate) == (0.9, 5, 3e-6)
    assert task.trainer.learning_key == "crm_contact_management"
    assert (task.trainer.min_reward, task.trainer.baseline_success) == (0.85, 0.78)
    default = load_profile("default").trainer
    assert (default.lmbda, default.beta, default.temperature, default.min_reward) == (1.0, 0.5, 0.9, 0.8)


def test_unknown_key_names_key_file_and_closest_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("trainer:\n  min_rewrd: 0.9\n  lmbda: 0.5\nteacher_model: x\n")
    with pytest.raises(ProfileError) as caught:
        load_profile(str(path))
    problems = caught.value.problems
    assert len(problems) == 2, problems
    reward = next(p for p in problems if "min_rewrd" in p)
    assert str(path) in reward and "`trainer.min_reward`" in reward
    teacher = next(p for p in problems if "teacher_model" in p)
    assert "`teacher_model_name_or_path`" in teacher


def test_all_problems_are_reported_at_once():
    with pytest.raises(ProfileError) as caught:
        load_profile("fast", ["trainer.lmbda=2", "data.limit=abc", "trainer.nope=1", "novalue"])
    text = str(caught.value)
    assert len(caught.value.problems) == 4
    for needle in ("trainer.lmbda=2", "data.limit=abc", "trainer.nope", "novalue"):
        assert needle in text


def test_precedence_defaults_profile_overrides_flags():
    assert load_profile("fast").trainer.min_reward == 0.7  # profile beats default 0.8
    assert load_profile("fast", ["trainer.min_reward=0.9"]).trainer.min_reward == 0.9
    flagged = load_profile("fast", ["trainer.min_reward=0.9"], {"--min-reward": ("trainer.min_reward", 0.95)})
    assert flagged.trainer.min_reward == 0.95
    unset_flag = load_profile("fast", ["trainer.min_reward=0.9"], {"--min-reward": ("trainer.min_reward", None)})
    assert unset_flag.trainer.min_reward == 0.9
    assert load_profile("fast").trainer.num_train_epochs == 1  # other keys keep the profile's value


def test_overrides_parse_yaml_values():
    assert parse_override("trainer.learning_key=null") == ("trainer.learning_key", None)
    assert parse_override("data.review_status=[approved,pending]") == ("data.review_status", ["approved", "pending"])
    assert parse_override("teacher_model_name_or_path=Qwen/Qwen2.5-14B-Instruct")[1] == "Qwen/Qwen2.5-14B-Instruct"
    profile = load_profile("task-specific", ["trainer.learning_key=null", "data.review_status=null"])
    assert profile.trainer.learning_key is None and profile.data.review_status is None


def test_profile_by_path_and_local_profiles_win(tmp_path, monkeypatch):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "fast.yaml").write_text("trainer:\n  min_reward: 0.55\n")
    monkeypatch.chdir(tmp_path)
    assert load_profile("fast").trainer.min_reward == 0.55
    assert load_profile("profiles/fast.yaml").trainer.min_reward == 0.55
    assert load_profile("high-quality").trainer.min_reward == 0.9  # still found in the package


def test_unknown_profile_suggests_the_closest():
    with pytest.raises(ProfileError) as caught:
        load_profile("fsat")
    assert "`fast`" in str(caught.value)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ProfileError, match="mapping"):
        load_profile(str(path))
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: [unclosed\n")
    with pytest.raises(ProfileError, match="YAML"):
        load_profile(str(broken))


def test_known_keys_are_dotted_leaves():
    keys = known_keys()
    assert "trainer.min_reward" in keys and "model.model_name_or_path" in keys and "trainer" not in keys


UPSTREAM_HIGH_QUALITY = """\
# configs/run/gkd_high_quality.yaml
defaults:
  - override /trainer@_global_: gkd

teacher_model_name_or_path: Qwen/Qwen2.5-14B-Instruct
model_name_or_path: Qwen/Qwen2.5-7B-Instruct

trainer:
  min_reward: 0.9           # Only excellent traces
  num_train_epochs: 5       # More training
  learning_rate: 3e-6       # Lower learning rate
"""


def test_an_upstream_run_config_loads_as_a_profile_with_one_note(cli, tmp_path):
    """The upstream page's configs/run/gkd_high_quality.yaml, verbatim: Hydra's `defaults` list is ignored with a
    note, the top-level model_name_or_path is the student, and a top-level trainer key moves under trainer."""
    (tmp_path / "gkd_high_quality.yaml").write_text(UPSTREAM_HIGH_QUALITY)
    shown = cli("profile", "show", "gkd_high_quality.yaml", "--json")
    assert shown.code == 0, shown.stderr
    profile = shown.json()
    assert profile["model"]["model_name_or_path"] == "Qwen/Qwen2.5-7B-Instruct"
    assert profile["teacher_model_name_or_path"] == "Qwen/Qwen2.5-14B-Instruct"
    assert (profile["trainer"]["min_reward"], profile["trainer"]["num_train_epochs"],
            profile["trainer"]["learning_rate"]) == (0.9, 5, 3e-6)
    assert shown.stderr.count("Note:") == 1 and "Hydra `defaults` list" in shown.stderr
    assert "model_name_or_path -> model.model_name_or_path" in shown.stderr
    (tmp_path / "top.yaml").write_text("lmbda: 0.5\nbeta: 0.3\ntrainer:\n  beta: 0.2\n")
    top = cli("profile", "show", "top.yaml", "--json")
    assert (top.json()["trainer"]["lmbda"], top.json()["trainer"]["beta"]) == (0.5, 0.2)  # the nested one wins
    assert "lmbda -> trainer.lmbda" in top.stderr
    ours = cli("profile", "show", "fast")
    assert ours.code == 0 and "Note:" not in ours.stderr  # our own profiles say nothing
