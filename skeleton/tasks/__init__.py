"""GLUE and SuperGLUE tasks: specs, official-format readers and metrics.

from skeleton.tasks import get_task
spec = get_task("SST-2")               # aliases and case are forgiven
spec.convert(row) -> Example           # row: a hub row or a local reader row (same fields)
metrics = spec.build_metrics()         # update(logits, batch) / compute() / reset()
"""

from skeleton.tasks import glue, superglue  # noqa: F401  (registers the specs)
from skeleton.tasks.metrics import TaskMetrics, answer_scores, normalize_answer, token_f1
from skeleton.tasks.readers import DataFormatError, encode_label, read_split
from skeleton.tasks.registry import FORMULATIONS, TASKS, Example, TaskSpec, get_task, register

__all__ = [
    "FORMULATIONS",
    "TASKS",
    "DataFormatError",
    "Example",
    "TaskMetrics",
    "TaskSpec",
    "answer_scores",
    "encode_label",
    "get_task",
    "normalize_answer",
    "read_split",
    "register",
    "token_f1",
]
