"""The persistent teacher store: the teacher's top-k log-probs at every target position of the training
conversations, computed once (`atlas-distill teacher-store build`) and read by off-policy steps
(`trainer.teacher_store`), so that a fully off-policy run never loads the teacher.

- `fingerprint`: the teacher's, the tokenizer's and each example's key, without loading a model;
- `store`: the layout on disk, `StoreKey` (what a store was built for) and `TeacherStore` (reading, checks);
- `build`: one resumable pass of the teacher.
Records are gkd/topk_format.py's, the in-memory cache's format.
"""

from .build import BuildResult, build_teacher_store
from .fingerprint import row_keys, teacher_fingerprint, tokenizer_fingerprint
from .store import StoreKey, TeacherStore

__all__ = ["BuildResult", "StoreKey", "TeacherStore", "build_teacher_store", "row_keys", "teacher_fingerprint",
           "tokenizer_fingerprint"]
