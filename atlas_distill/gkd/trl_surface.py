"""Everything we take from TRL, in one place (trl==1.16.0 is pinned in pyproject.toml).

- `trl.experimental.gkd.GKDTrainer` and `GKDConfig`: the trainer we build on (on-policy generation, the
  generalized JSD, the lmbda/beta/temperature/seq_kd settings). Experimental in TRL 1.16, which points fully
  on-policy users to the stable `trl.DistillationTrainer` (issue 15 measures us against it).
- `trl.SFTTrainer.training_step`: GKDTrainer's own parent step, which ours calls after generating.
- `trl.models.utils.unwrap_model_for_generation`: generation from a DeepSpeed/FSDP-wrapped model.
- `trl.models.utils._ForwardRedirection` (a private name): routes the chunked divergence's lm_head through the
  wrapped model's forward, so FSDP/ZeRO-3 gather its weights.

Importing `trl.experimental` warns that it is experimental; that notice is filtered here, for this import only.
A TRL without one of these fails here, at import, with what to install.
"""

from __future__ import annotations

import warnings

try:
    from trl import SFTTrainer
    from trl.models.utils import _ForwardRedirection, unwrap_model_for_generation

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError as exc:  # pragma: no cover - only with an unpinned TRL
    from importlib.metadata import version

    raise ImportError(f"atlas-distill needs TRL's GKD surface (trl.experimental.gkd, trl.models.utils "
                      f"._ForwardRedirection; see atlas_distill/gkd/trl_surface.py), which trl {version('trl')} "
                      f"lacks: {exc}. Install the pinned version: pip install trl==1.16.0") from exc

__all__ = ["GKDConfig", "GKDTrainer", "SFTTrainer", "_ForwardRedirection", "unwrap_model_for_generation"]
