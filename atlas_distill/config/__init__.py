"""Profiles: typed, strict configuration shared by every subcommand.

Precedence, lowest first: the defaults declared in `schema` < the profile YAML <
dotted overrides given as trailing arguments (``trainer.min_reward=0.9``) <
explicit command-line flags. Every problem in a profile or override is reported
at once, each naming the key, where it came from and the closest valid key.

Modules: `schema` (the typed sections and their validation) and `loader` (finding, reading and resolving
profiles).
"""

from .loader import (LOCAL_PROFILE_DIR, PACKAGED_PROFILES, Null, Widen, known_keys, load_profile, parse_override,
                     profile_paths, profile_to_yaml, resolve_profile_path)
from .schema import (REVIEW_STATUSES, SESSION_STATUSES, DatabaseConfig, DataConfig, LoraConfig, ModelConfig, Profile,
                     TeacherInitConfig, TrainerConfig)

__all__ = ["LOCAL_PROFILE_DIR", "PACKAGED_PROFILES", "REVIEW_STATUSES", "SESSION_STATUSES", "DataConfig",
           "DatabaseConfig", "LoraConfig", "ModelConfig", "Null", "Profile", "TeacherInitConfig", "TrainerConfig",
           "Widen", "known_keys", "load_profile", "parse_override", "profile_paths", "profile_to_yaml",
           "resolve_profile_path"]
