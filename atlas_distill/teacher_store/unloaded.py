"""The teacher of a run whose every step reads the teacher store: its config, never its weights."""

from __future__ import annotations

import torch

from ..errors import TrainingError


class UnloadedTeacher(torch.nn.Module):
    """Stands where the teacher model would: `config` and `name_or_path` (what the trainer's checks read), no
    parameters, no memory. Running it is a TrainingError: a step that needs the live teacher was not foreseen."""

    def __init__(self, name_or_path: str, *, trust_remote_code: bool = False) -> None:
        from transformers import AutoConfig

        super().__init__()
        self.name_or_path = name_or_path
        self.config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        # the embedding's shape, for the shared-vocabulary check; on the meta device and not a submodule, so it holds
        # no memory and nothing moves or counts it
        rows = self.config.get_text_config().vocab_size
        object.__setattr__(self, "_embeddings", torch.nn.Embedding(rows, 1, device="meta"))

    def forward(self, *args, **kwargs):
        raise TrainingError("A step needed the live teacher, which this run did not load (every step was to read "
                            "the teacher store).", fix="Report this as a bug; meanwhile train without "
                            "trainer.teacher_store.")

    def get_input_embeddings(self):
        return self._embeddings

    def get_output_embeddings(self):
        return None
