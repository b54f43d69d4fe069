"""The models that need no network, by name, with the function that builds each.

Each builtin is named here with the function that builds it (once, into the cache), as "module:function": the
demo teacher lives in atlas_distill.demo (it is fine-tuned on the demo traces) and itself builds on the builtin
model, so it is found by name when first used rather than imported here.
"""

from __future__ import annotations

import importlib

from ..progress import Progress, no_progress

# name -> "module:function(progress)" building (once) and returning the checkpoint directory
BUILTINS = {"smollm2-135m": "atlas_distill.models.builtin:builtin_model_dir",
            "smollm2-135m-crm": "atlas_distill.demo.teacher:crm_teacher_dir"}


def build_builtin(name: str, progress: Progress = no_progress):
    """The checkpoint directory of the builtin `name`, built on first use."""
    module, _, function = BUILTINS[name].partition(":")
    return getattr(importlib.import_module(module), function)(progress)
