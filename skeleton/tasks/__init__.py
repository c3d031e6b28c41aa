"""GLUE and SuperGLUE tasks: specs, official-format readers and metrics.

from skeleton.tasks import get_task
spec = get_task("SST-2")               # aliases and case are forgiven
spec.convert(row) -> Example           # row: a hub row or a local reader row (same fields)
metrics = spec.build_metrics()         # update(logits, batch) / compute() / reset()

Importing this package does not import torch: the specs, readers and benchmark layout are plain Python,
so tables and dashboards can use them. `TaskMetrics` (torchmetrics) loads on first use.
"""

from skeleton.tasks import glue, superglue  # noqa: F401  (registers the specs)
from skeleton.tasks.answers import answer_scores, normalize_answer, token_f1
from skeleton.tasks.readers import DataFormatError, encode_label, read_split
from skeleton.tasks.registry import (
    BENCHMARKS,
    COMPOSITES,
    FORMULATIONS,
    TASKS,
    Example,
    TaskSpec,
    benchmark_tasks,
    display_name,
    get_task,
    register,
)

__all__ = [
    "BENCHMARKS",
    "COMPOSITES",
    "FORMULATIONS",
    "TASKS",
    "DataFormatError",
    "Example",
    "TaskMetrics",
    "TaskSpec",
    "answer_scores",
    "benchmark_tasks",
    "display_name",
    "encode_label",
    "get_task",
    "normalize_answer",
    "read_split",
    "register",
    "token_f1",
]


def __getattr__(name: str):
    if name == "TaskMetrics":  # the one torch-backed name: imported when asked for
        from skeleton.tasks.metrics import TaskMetrics

        return TaskMetrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
