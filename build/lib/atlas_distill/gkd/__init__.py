"""GKD on Atlas traces: the trainer built on TRL (imports torch and trl; import it lazily)."""

from .trainer import AtlasGKDTrainer, GKDConfig

__all__ = ["AtlasGKDTrainer", "GKDConfig"]
