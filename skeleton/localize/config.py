"""The Skeleton step's settings: validated dataclasses, the one source of their defaults.

``skeleton/conf/skeleton/default.yaml`` restates these defaults with comments for people reading the config, and
a test pins it to this module, so the two cannot drift. Every check runs in ``__post_init__``: a run
builds its ``SkeletonConfig`` in its first second, before any data or model is loaded, so a typo never
costs a training run. Torch-free (tables and the CLI's help import it cheaply).

Why not a Hydra structured config (ConfigStore schema)? OmegaConf converts strings to Enums by member
*name* and serialises them as names; our cache keys and run configs hash the resolved YAML, so plain
values plus one explicit validation step keep both exact and readable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work: the message names the key, the value and what is allowed."""


class Choice(str, Enum):
    """A string setting with a closed set of values; compares equal to its plain string."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Criterion(Choice):
    ATTRIBUTION = "attribution"  # activation x gradient (the papers)
    ACTIVATION = "activation"
    GRADIENT = "gradient"
    MAGNITUDE = "magnitude"  # weight norm: data-free baseline
    RANDOM = "random"  # data-free baseline


class Target(Choice):
    LOGPROB = "logprob"  # log-probability of the gold label
    LOGIT = "logit"
    LOSS = "loss"


class TokenAgg(Choice):
    MEAN = "mean"
    MAX = "max"
    SUM = "sum"


class Magnitude(Choice):
    TOKEN = "token"  # agg_t |a*g|: a neuron that matters on some tokens keeps its score
    INSTANCE = "instance"  # |agg_t a*g|: signed contributions may cancel within an instance


class Scope(Choice):
    GLOBAL = "global"  # one ranking across layers
    LAYER = "layer"  # the same rate in every layer


DATA_FREE = (Criterion.MAGNITUDE, Criterion.RANDOM)


def choice(kind: type[Choice], value: Any, key: str) -> Choice:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(c.value for c in kind)
        raise ConfigError(f"{key}={value!r} is unknown; choose one of: {allowed}") from None


def check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {rule}")


def rounds_of(step: float, until: float) -> list[float]:
    """The masked rates at which iterative attribution scores again: step, 2*step, ... <= until."""
    check(
        0 <= step < 1, "skeleton.attribution.iterative_step", step, "use 0 (score once) or a step in (0, 1)"
    )
    check(0 <= until < 1, "skeleton.attribution.iterative_until", until, "use a rate in [0, 1)")
    if step == 0:
        return []
    rounds = [round(k * step, 10) for k in range(1, int(until / step + 1e-9) + 1)]
    check(
        bool(rounds),
        "skeleton.attribution.iterative_until",
        until,
        f"it is below iterative_step={step}, so no round would re-score; raise it or set iterative_step=0",
    )
    return rounds


@dataclass
class AttributionConfig:
    criterion: Criterion = Criterion.ATTRIBUTION
    target: Target = Target.LOGPROB
    token_agg: TokenAgg = TokenAgg.MEAN
    magnitude: Magnitude = Magnitude.TOKEN
    max_instances: int = 512
    unsupervised: bool = False  # the model's own predictions as targets (2205.04157)
    heads: bool = False  # also score attention heads
    # Aggregate over the soft prompt positions too: pruning removes a neuron there as well, and
    # first-layer neurons that mostly process the prompt would score ~0 otherwise (README, Choices).
    include_prompt: bool = True
    # Re-score under the mask of the lowest step, 2*step, ... up to `until` (0 = score once, as in the
    # papers): neurons' roles shift as others go.
    iterative_step: float = 0.1
    iterative_until: float = 0.8

    def __post_init__(self):
        key = "skeleton.attribution"
        self.criterion = choice(Criterion, self.criterion, f"{key}.criterion")
        self.target = choice(Target, self.target, f"{key}.target")
        self.token_agg = choice(TokenAgg, self.token_agg, f"{key}.token_agg")
        self.magnitude = choice(Magnitude, self.magnitude, f"{key}.magnitude")
        check(
            self.max_instances >= 1, f"{key}.max_instances", self.max_instances, "score at least 1 instance"
        )
        rounds_of(self.iterative_step, self.iterative_until)

    @property
    def iterative(self) -> bool:
        return self.iterative_step > 0 and self.criterion not in DATA_FREE


@dataclass
class PruningConfig:
    scope: Scope = Scope.GLOBAL
    min_per_layer: int = 0  # floor on any layer's FFN width
    round_to: int = 1  # kept widths rounded up to a multiple (8, 64) for GPU kernels
    head_rate: float = 0.0  # fraction of attention heads removed (needs attribution.heads=true)

    def __post_init__(self):
        key = "skeleton.pruning"
        self.scope = choice(Scope, self.scope, f"{key}.scope")
        check(self.min_per_layer >= 0, f"{key}.min_per_layer", self.min_per_layer, "use a width >= 0")
        check(self.round_to >= 1, f"{key}.round_to", self.round_to, "use a multiple >= 1 (1: no rounding)")
        check(0 <= self.head_rate < 1, f"{key}.head_rate", self.head_rate, "use a fraction in [0, 1)")


@dataclass
class SearchConfig:
    granularity: float = 0.01  # rate grid step
    max_rate: float = 0.99
    lookahead: int = 2  # grid points probed past a failing rate: a one-point dip does not end the search

    def __post_init__(self):
        key = "skeleton.search"
        check(0 < self.granularity <= 1, f"{key}.granularity", self.granularity, "use a step in (0, 1]")
        check(0 <= self.max_rate <= 1, f"{key}.max_rate", self.max_rate, "use a fraction in [0, 1]")
        check(self.lookahead >= 0, f"{key}.lookahead", self.lookahead, "use 0 (plain binary search) or more")


@dataclass
class RecoveryConfig:
    steps: int = 0  # > 0: tune prompt + head again on the pruned (still frozen) backbone
    lr: float = 1e-2

    def __post_init__(self):
        check(self.steps >= 0, "skeleton.recovery.steps", self.steps, "use 0 (off) or a number of steps")
        check(self.lr > 0, "skeleton.recovery.lr", self.lr, "use a learning rate > 0")


@dataclass
class BenchmarkConfig:
    batch_size: int = 32  # examples per timed forward (real dev inputs)
    repeats: int = 10  # interleaved dense/pruned calls; the median is reported

    def __post_init__(self):
        check(self.batch_size >= 1, "skeleton.benchmark.batch_size", self.batch_size, "use >= 1")
        check(self.repeats >= 1, "skeleton.benchmark.repeats", self.repeats, "use >= 1")


SECTIONS = {
    "attribution": AttributionConfig,
    "pruning": PruningConfig,
    "search": SearchConfig,
    "recovery": RecoveryConfig,
    "benchmark": BenchmarkConfig,
}


@dataclass
class SkeletonConfig:
    """The ``skeleton`` config group. ``psi`` is in points of the task's headline metric."""

    enabled: bool = True
    psi: float = 1.0
    restore_best: bool = True  # localize the best validation checkpoint's prompt, not the last one
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def __post_init__(self):
        for name, kind in SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, kind):
                setattr(self, name, build(kind, value or {}, f"skeleton.{name}"))
        check(self.psi >= 0, "skeleton.psi", self.psi, "it is the allowed drop in points; use psi >= 0")
        if self.pruning.head_rate > 0 and not self.attribution.heads:
            raise ConfigError(
                f"skeleton.pruning.head_rate={self.pruning.head_rate} needs head scores: "
                "set skeleton.attribution.heads=true (or head_rate=0)"
            )

    @property
    def margin(self) -> float:
        """psi as a fraction of the metric: the one place points become the metric's [0, 1] units."""
        return self.psi / 100.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> SkeletonConfig:
        return build(cls, values or {}, "skeleton")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (Enums as their strings)."""
        return _plain(asdict(self))


def build(kind: type, values: Mapping[str, Any], key: str):
    """``kind(**values)``, refusing unknown keys by name (a typo must not silently fall back to a default)."""
    known = [f.name for f in fields(kind)]
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]} is not a setting; the settings of {key} are: {', '.join(known)}"
        )
    return kind(**{name: _typed(kind, name, value, key) for name, value in values.items()})


NUMBERS = {"int": int, "float": float}


def _typed(kind: type, name: str, value: Any, key: str) -> Any:
    """Numbers and booleans as their declared type, so a typo such as ``lr=1e-2x`` is named, not a
    TypeError deep inside a check."""
    declared = {f.name: f.type for f in fields(kind)}[name]
    if declared == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}.{name}={value!r} is invalid: use true or false")
    if declared in NUMBERS and not isinstance(value, bool):
        try:
            number = NUMBERS[declared](value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}.{name}={value!r} is invalid: use a number ({declared})") from None
        if declared == "int" and number != float(value):
            raise ConfigError(f"{key}.{name}={value!r} is invalid: use a whole number")
        return number
    return value


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node.value if isinstance(node, Enum) else node
