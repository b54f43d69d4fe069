"""RunDir: one run's directory and everything `train` keeps in it.

    <output_dir>/<run_name>/
      profile.yaml            the resolved profile (password masked), written when the run starts
      before_training.json    teacher and student-before figures, reused by --resume
      metrics.jsonl           every log record (tracking.RunTracker)
      checkpoint-N/           whole or absent (outputs.py stages each one), the newest resumable
      final/                  the trained student, its tokenizer, README.md (model card) and profile.yaml
      summary.json            the RunSummary, written last

`train` makes and fills it; `chain` asks whether a stage's is complete and where to resume; `compare` reads the
summary back (runs.py). Every write is whole or absent, and a failed check leaves nothing behind.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import Profile, profile_to_yaml
from ..errors import OutputError, UsageError
from ..outputs import (FREE_SPACE_FIX, check_free_space, check_writable_dir, ensure_writable_dir,
                      last_complete_checkpoint, remove_incomplete_checkpoints, write_json)
from ..progress import Event
from .summary import Figures, RunSummary

_DIR_FIX = "Choose a writable output_dir (--output-dir) or free disk space."


class RunDir:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @classmethod
    def for_profile(cls, profile: Profile, profile_name: str) -> RunDir:
        """`output_dir/run_name`; without a run name, the profile's name and the time."""
        return cls(Path(profile.output_dir) / (profile.run_name or f"{Path(profile_name).stem}-"
                                                                    f"{datetime.now():%Y%m%d-%H%M%S}"))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    # -- before the run

    def prepare(self, *, resume: bool, emit: Event) -> Path | None:
        """Check the directory for a new run, or clean it up for --resume; the checkpoint to resume from. A new
        run's directory is made later (`start`), so a check that fails leaves nothing."""
        from .tracking import rewind_metrics

        if resume:
            for removed in remove_incomplete_checkpoints(self.path):
                emit("line", f"Removed the incomplete checkpoint {removed} (the run stopped while writing it)")
            checkpoint = self.last_checkpoint()
            if checkpoint is None:
                raise UsageError(f"--resume: {self.path} holds no checkpoint to continue.",
                                 fix="Check --output-dir and --run-name, or start the run without --resume.")
            rewind_metrics(self.path, checkpoint_step(checkpoint))
            return checkpoint
        if self.path.is_dir() and any(self.path.iterdir()):
            raise UsageError(f"The run directory {self.path} already holds a run.",
                             fix="Pass --resume to continue it, or choose another --run-name.")
        check_writable_dir(self.path.parent, "output directory", fix=_DIR_FIX)
        return None

    def start(self, profile: Profile, student) -> str | None:
        """Once data and models are loaded: the free-space check, then the directory and its profile.yaml.
        Returns the free-space warning, if any."""
        warning = check_free_space(self.path, student, profile.trainer.save_total_limit)
        ensure_writable_dir(self.path, "run directory", fix=_DIR_FIX)
        self.write_text("profile.yaml", profile_to_yaml(profile))
        return warning

    # -- checkpoints and resume

    def last_checkpoint(self) -> Path | None:
        """The newest whole checkpoint (one with trainer_state.json, which transformers writes last)."""
        return last_complete_checkpoint(self.path)

    def finished_summary(self) -> RunSummary | None:
        """The run's summary when final/ and summary.json are whole (a finished run), else None."""
        if not ((self.final / "config.json").is_file() and any(self.final.glob("*.safetensors"))):
            return None
        summary = self.read_summary()
        return summary if summary is not None and summary.baseline is not None else None

    # -- records

    def before_training(self, key: dict[str, Any]) -> tuple[Figures | None, Figures] | None:
        """The teacher and student-before figures saved under the same `key`, else None (teacher's: None when the
        run did not load it)."""
        try:
            saved = json.loads((self.path / "before_training.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("key") != key:
            return None
        teacher = saved["teacher_eval"]
        return Figures.from_dict(teacher) if teacher else None, Figures.from_dict(saved["student_before"])

    def save_before_training(self, key: dict[str, Any], teacher: Figures | None, student: Figures) -> None:
        write_json(self.path / "before_training.json",
                   {"key": key, "teacher_eval": teacher and teacher.to_dict(), "student_before": student.to_dict()})

    def write_summary(self, summary: RunSummary) -> None:
        write_json(self.summary_path, summary.to_dict())

    def read_summary(self) -> RunSummary | None:
        """summary.json as a RunSummary; None when it is missing or unreadable."""
        try:
            document = json.loads(self.summary_path.read_text())
            return RunSummary.from_dict(document) if isinstance(document, dict) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write_final_records(self, model_card: str, profile: Profile) -> None:
        """final/README.md and final/profile.yaml: a copied final/ keeps its description and configuration."""
        self.write_text("final/README.md", model_card)
        self.write_text("final/profile.yaml", profile_to_yaml(profile))

    def write_text(self, relative: str, text: str) -> None:
        path = self.path / relative
        try:
            path.write_text(text)
        except OSError as exc:
            raise OutputError(f"Cannot write {path}: {exc.strerror}.", fix=FREE_SPACE_FIX) from None


def checkpoint_step(checkpoint: Path) -> int:
    """The global step a checkpoint was saved at (its trainer_state.json)."""
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]

