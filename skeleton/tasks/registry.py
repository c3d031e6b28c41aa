"""What a task is (`TaskSpec`), what one model input is (`Example`), and the name -> spec registry.

A spec is pure data plus one converter: it says where the official files live, which hub dataset mirrors
them, how rows turn into `Example`s and how predictions are scored. Readers, the data module and the
metrics all key off the spec, so adding a task is adding one `TaskSpec`.

How a benchmark is scored (which tasks it has, in which order, their display names, which specs are one
leaderboard task, which are diagnostics, what a composite metric averages) is declared here too, and
torch-free, so the tables and dashboards read it instead of keeping their own copy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

FORMULATIONS = ("classification", "regression", "multiple_choice")
# Composite headline -> the two metrics it is the mean of (the leaderboards' task score). The metrics
# compute it; tables rebuild it from its parts for a summary that lacks it.
COMPOSITES = {
    "acc_f1": ("accuracy", "f1"),
    "pearson_spearman": ("pearson", "spearman"),
    "acc_macro_f1": ("accuracy", "macro_f1"),
}


@dataclass
class Example:
    """One model input. `texts` holds one (text_a, text_b) pair per choice, exactly one unless the
    formulation is multiple_choice; `label` is a class index, a regression target or the index of the
    correct choice (-1 when unlabelled). `group` is MultiRC's question id (EM needs every answer of a
    question right); `candidate_scores` is ReCoRD's (EM, F1) of each candidate against the gold answers."""

    texts: list[tuple[str, str | None]]
    label: int | float
    group: int | None = None
    candidate_scores: list[tuple[float, float]] | None = None


@dataclass(frozen=True, eq=False)
class TaskSpec:
    """Everything the code needs to know about one task. Frozen, compared by identity (specs are singletons).

    `files` / `hub_splits` map our split names ("train", "dev", extra eval splits such as
    "dev_mismatched", "test") to the official file name and the hub split name. `columns` maps hub field
    -> official TSV column (GLUE); `header` names the columns of header-less TSVs (CoLA); `fields` lists
    the hub fields a JSONL row must have and `flatten` turns one nested official JSONL row into hub-style
    rows (SuperGLUE). `metrics` are the keys `build_metrics().compute()` returns; `headline` is one of them.

    For tables: `display` is the task's name there (default: `folder`); a `diagnostic` is an evaluation-only
    probe left out of the benchmark average; `averaged_into` names the leaderboard task this spec is one dev
    set of (MNLI mismatched -> "mnli"): the specs of one leaderboard task are averaged into one score before
    the benchmark mean, shown as that task's `averaged_display`.
    """

    name: str
    benchmark: str
    folder: str
    files: dict[str, str]
    hub_id: str
    hub_config: str
    hub_splits: dict[str, str]
    labels: tuple[str, ...] | None
    formulation: str
    metrics: tuple[str, ...]
    headline: str
    convert: Callable[[dict], Example]
    columns: dict[str, str] | None = None
    header: tuple[str, ...] | None = None
    fields: tuple[str, ...] = ()
    flatten: Callable[[dict], Iterable[dict]] | None = None
    num_choices: int | None = 1
    aliases: tuple[str, ...] = ()
    display: str = ""
    diagnostic: bool = False
    averaged_into: str | None = None
    averaged_display: str | None = None

    def __post_init__(self):
        assert self.formulation in FORMULATIONS, self.formulation
        assert self.headline in self.metrics, (self.name, self.headline)
        assert "train" in self.files or "dev" in self.files, self.name
        if not self.display:
            object.__setattr__(self, "display", self.folder)

    @property
    def score_unit(self) -> str:
        """The leaderboard task this spec's score counts toward (itself unless `averaged_into`)."""
        return self.averaged_into or self.name

    @property
    def num_labels(self) -> int:
        """Output units per input row: classes for classification, 1 for regression and for
        multiple_choice (one score per choice row; the choices are compared by a softmax over rows)."""
        return len(self.labels) if self.formulation == "classification" else 1

    @property
    def train_file(self) -> str | None:
        return self.files.get("train")

    @property
    def dev_file(self) -> str:
        return self.files["dev"]

    def build_metrics(self):
        """A fresh `TaskMetrics` (update(logits, batch) / compute() -> dict[str, float] / reset())."""
        from skeleton.tasks.metrics import TaskMetrics

        return TaskMetrics(self)


TASKS: dict[str, TaskSpec] = {}  # canonical name -> spec, in registration order (= table order)
BENCHMARKS: dict[str, str] = {}  # benchmark -> display name ("glue" -> "GLUE"), in registration order
_BY_KEY: dict[str, TaskSpec] = {}


def _key(name: str) -> str:
    """Forgiving lookup key: "SST-2", "sst_2" and "sst2" all mean the same task."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def register(spec: TaskSpec) -> TaskSpec:
    for key in {_key(k) for k in (spec.name, f"{spec.benchmark}-{spec.name}", *spec.aliases)}:
        if _BY_KEY.get(key, spec) is not spec:
            raise ValueError(f"task name {key!r} of {spec.name!r} is already taken by {_BY_KEY[key].name!r}")
        _BY_KEY[key] = spec
    TASKS[spec.name] = spec
    return spec


def register_benchmark(name: str, display: str) -> str:
    BENCHMARKS[name] = display
    return name


def benchmark_tasks(benchmark: str, diagnostics: bool = True) -> tuple[str, ...]:
    """The canonical names of `benchmark`'s tasks in registration order; without the diagnostics if asked."""
    return tuple(
        n for n, s in TASKS.items() if s.benchmark == benchmark and (diagnostics or not s.diagnostic)
    )


def display_name(task: str) -> str:
    """The table name of a canonical task name ("sst2" -> "SST-2"); other names are shown as given."""
    spec = TASKS.get(task)
    return spec.display if spec else task


def register_benchmark_task(
    benchmark: str, name: str, folder: str, labels, *, files: dict, hub_id: str, hub_splits: dict, **kw
) -> TaskSpec:
    """Register a task of a benchmark whose tasks share official file names and a hub dataset
    (`hub_config` defaults to the task's name)."""
    spec = TaskSpec(
        name=name,
        benchmark=benchmark,
        folder=folder,
        files=files,
        hub_id=hub_id,
        hub_config=kw.pop("hub_config", name),
        hub_splits=hub_splits,
        labels=labels,
        **kw,
    )
    return register(spec)


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The spec registered under `name` or one of its aliases (case, '-', '_' and '/' ignored)."""
    if isinstance(name, TaskSpec):
        return name
    spec = _BY_KEY.get(_key(str(name)))
    if spec is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return spec
