"""Each GKD setting of ours is written once (gkd/settings.py) and reaches the trainer through AtlasGKDConfig."""

import dataclasses

import pytest

from atlas_distill.config import DataConfig, Profile, TrainerConfig
from atlas_distill.gkd import AtlasGKDConfig, GKDConfig
from atlas_distill.gkd.config import from_profile
from atlas_distill.gkd.settings import SETTINGS
from atlas_distill.gkd.trl_surface import GKDConfig as TRLGKDConfig

# A value for each setting that is not its default, so a copy that drops one shows.
CHANGED = {"learning_key": "crm_workflows", "eval_split": 0.25, "targets": "final", "offpolicy_warmup_steps": 7,
           "offpolicy_warmup_beta": 0.3, "scorer": "exact", "eval_max_sessions": 11, "success_delta_target": 0.2,
           "token_reduction_target": 12.0, "kv_cache_generation": False, "chunked_loss": False,
           "teacher_cache_topk": 17, "teacher_store": "stores/run-1", "group_by_length": False, "group_by_turn": False,
           "generation_dtype": "float32", "inverse_cdf_sampling": False, "packed_generation": False,
           "lean_decoding": False, "prefill_once": False, "replay_generation": False, "lean_recompute": False,
           "keep_freed_memory": False, "compact_optimizer": False, "math_attention": False, "lean_activations": False}
PROFILE_ONLY = {"baseline_success", "baseline_tokens"}  # a profile's `auto` is measured by `train`


def test_every_setting_is_a_field_of_the_config_with_its_help():
    fields = {f.name: f for f in dataclasses.fields(AtlasGKDConfig)}
    assert GKDConfig is AtlasGKDConfig and issubclass(AtlasGKDConfig, TRLGKDConfig)
    for name, declared in SETTINGS.items():
        assert fields[name].default == declared.default and fields[name].metadata["help"], name


def test_the_profile_schema_takes_default_and_help_from_the_one_declaration():
    assert set(CHANGED) | PROFILE_ONLY == set(SETTINGS)
    for name in CHANGED:
        schema = DataConfig if name in ("eval_split", "targets") else TrainerConfig
        field = schema.model_fields[name]
        assert (field.default, field.description) == (SETTINGS[name].default, SETTINGS[name].metadata["help"]), name


def test_from_profile_copies_every_setting(tmp_path):
    profile = Profile()
    for name, value in CHANGED.items():
        setattr(profile.data if name in ("eval_split", "targets") else profile.trainer, name, value)
    config = from_profile(profile, tmp_path / "run", report_to=[])
    assert {name: getattr(config, name) for name in CHANGED} == CHANGED
    assert (config.baseline_success, config.baseline_tokens) == (None, None)  # measured later by `train`


@pytest.mark.parametrize(("name", "value"), [("targets", "some"), ("scorer", "fuzzy"), ("eval_split", 1.0)])
def test_a_bad_value_is_refused_when_the_config_is_made(tmp_path, name, value):
    with pytest.raises(ValueError, match=name):
        AtlasGKDConfig(output_dir=str(tmp_path), bf16=False, **{name: value})


def test_the_trainer_refuses_trls_own_config_and_names_ours(tmp_path, make_tiny_model):
    from transformers import AutoModelForCausalLM

    from atlas_distill.gkd import AtlasGKDTrainer

    model = make_tiny_model(seed=1)
    with pytest.raises(TypeError, match=r"from atlas_distill import GKDConfig"):
        AtlasGKDTrainer(model=AutoModelForCausalLM.from_pretrained(model),
                        teacher_model=AutoModelForCausalLM.from_pretrained(model),
                        args=TRLGKDConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True), train_dataset=[])
