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


class HeadScore(Choice):
    CHANNELS = "channels"  # sum of the head's channels' scores, each aggregated as a neuron's is
    SIGNED = "signed"  # the whole head's Taylor estimate: its channels summed per token, then aggregated


class Scope(Choice):
    GLOBAL = "global"  # one ranking across layers
    LAYER = "layer"  # the same rate in every layer


class Units(Choice):
    JOINT = "joint"  # heads and FFN neurons ranked together by score per modelled cost; search on latency
    FFN = "ffn"  # FFN neurons only, the largest rate within psi (the papers)
    BEST = "best"  # the joint ranking, then FFN neurons alone past its rate: the lower modelled latency wins

    @property
    def ranks_heads(self) -> bool:
        """Whether heads are ranked with the neurons (joint ranking, searched in modelled cost)."""
        return self in (Units.JOINT, Units.BEST)


class Acceptance(Choice):
    CONFIRM = "confirm"  # search on one part of the search split, confirm the rate on the other
    POOLED = "pooled"  # search on one part, confirm the rate on both parts together (the whole split)
    PAIRED_SE = "paired_se"  # drop + z * paired standard error within psi
    POINT = "point"  # the drop alone within psi (the papers)


class CostKind(Choice):
    AUTO = "auto"  # a cached measurement, else measured on an idle machine, else FLOPs
    MEASURED = "measured"  # timed once per backbone, device and deployment shape, cached
    FLOPS = "flops"  # analytic: no timing, no fixed sublayer costs


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
    max_instances: int = 256
    # Instances per re-scoring round, at most max_instances (None: max_instances). The first pass ranks
    # everything; a round only reorders the units past the rates already masked.
    round_instances: int | None = 128
    unsupervised: bool = False  # the model's own predictions as targets (2205.04157)
    heads: bool = True  # also score attention heads (pruning.units=joint ranks them with the neurons)
    # How a head's channels add up: "channels" scores a head as the neurons it feeds the output projection
    # with (comparable with FFN neurons); "signed" lets its channels cancel first (README, Choices).
    head_score: HeadScore = HeadScore.CHANNELS
    # Aggregate over the soft prompt positions too: pruning removes a neuron there as well, and
    # first-layer neurons that mostly process the prompt would score ~0 otherwise (README, Choices).
    include_prompt: bool = True
    # Re-score under the mask of the lowest step, 2*step, ... up to `until` (0 = score once, as in the
    # papers): neurons' roles shift as others go.
    iterative_step: float = 0.1
    iterative_until: float = 0.8
    # Stop re-scoring once a round's new scores change at most (1 - this) of what the next round drops
    # (Jaccard overlap of the two drop sets; 1.0 = always run every round). Joint ranking only.
    iterative_stop: float = 1.0
    # Joint ranking: run a re-scoring round only when the search asks for a rate it decides (the ranking
    # up to a round's rate is exact without the rounds after it, so the result is the same, sooner).
    lazy_rounds: bool = True

    def __post_init__(self):
        key = "skeleton.attribution"
        self.criterion = choice(Criterion, self.criterion, f"{key}.criterion")
        self.target = choice(Target, self.target, f"{key}.target")
        self.token_agg = choice(TokenAgg, self.token_agg, f"{key}.token_agg")
        self.magnitude = choice(Magnitude, self.magnitude, f"{key}.magnitude")
        self.head_score = choice(HeadScore, self.head_score, f"{key}.head_score")
        check(
            self.max_instances >= 1, f"{key}.max_instances", self.max_instances, "score at least 1 instance"
        )
        check(
            self.round_instances is None or self.round_instances >= 1,
            f"{key}.round_instances",
            self.round_instances,
            "use null (max_instances) or at least 1 instance",
        )
        rounds_of(self.iterative_step, self.iterative_until)
        check(
            0 <= self.iterative_stop <= 1,
            f"{key}.iterative_stop",
            self.iterative_stop,
            "use an overlap in [0, 1] (1.0: never stop re-scoring early)",
        )

    @property
    def instances_per_round(self) -> int:
        """A re-scoring round's sample: round_instances, never more than the first pass's."""
        return min(self.round_instances or self.max_instances, self.max_instances)

    @property
    def iterative(self) -> bool:
        return self.iterative_step > 0 and self.criterion not in DATA_FREE


@dataclass
class PruningConfig:
    units: Units = Units.JOINT
    scope: Scope = Scope.GLOBAL
    min_per_layer: int = 0  # floor on any layer's FFN width
    round_to: int = 1  # kept widths rounded up to a multiple (8, 64) for GPU kernels
    head_rate: float = 0.0  # units=ffn: fraction of attention heads removed (needs attribution.heads=true)

    def __post_init__(self):
        key = "skeleton.pruning"
        self.units = choice(Units, self.units, f"{key}.units")
        self.scope = choice(Scope, self.scope, f"{key}.scope")
        check(self.min_per_layer >= 0, f"{key}.min_per_layer", self.min_per_layer, "use a width >= 0")
        check(self.round_to >= 1, f"{key}.round_to", self.round_to, "use a multiple >= 1 (1: no rounding)")
        check(0 <= self.head_rate < 1, f"{key}.head_rate", self.head_rate, "use a fraction in [0, 1)")
        if self.units.ranks_heads:
            check(
                self.head_rate == 0,
                f"{key}.head_rate",
                self.head_rate,
                f"units={self.units.value} ranks heads with the neurons; use head_rate=0 or units=ffn",
            )
            check(
                self.scope == Scope.GLOBAL,
                f"{key}.scope",
                self.scope.value,
                f"units={self.units.value} ranks every unit of every layer together; use scope=global or units=ffn",
            )


@dataclass
class SearchConfig:
    granularity: float = 0.01  # rate grid step
    max_rate: float = 0.99
    lookahead: int = 2  # grid points probed past a failing rate: a one-point dip does not end the search
    acceptance: Acceptance = Acceptance.POOLED
    confirm_fraction: float = 0.5  # acceptance=confirm/pooled: share of the search split the search runs on
    z: float = 1.0  # acceptance=paired_se: standard errors added to the drop
    resamples: int = 200  # paired bootstrap resamples for the drops' standard errors (0: none)

    def __post_init__(self):
        key = "skeleton.search"
        self.acceptance = choice(Acceptance, self.acceptance, f"{key}.acceptance")
        check(
            0 < self.confirm_fraction < 1,
            f"{key}.confirm_fraction",
            self.confirm_fraction,
            "use a fraction in (0, 1): the search runs on it, the confirmation on the rest",
        )
        check(self.z >= 0, f"{key}.z", self.z, "use a number of standard errors >= 0")
        check(self.resamples >= 0, f"{key}.resamples", self.resamples, "use 0 (none) or more resamples")
        check(
            self.acceptance != Acceptance.PAIRED_SE or self.resamples >= 2,
            f"{key}.resamples",
            self.resamples,
            "acceptance=paired_se needs standard errors: use resamples >= 2",
        )
        check(0 < self.granularity <= 1, f"{key}.granularity", self.granularity, "use a step in (0, 1]")
        check(0 <= self.max_rate <= 1, f"{key}.max_rate", self.max_rate, "use a fraction in [0, 1]")
        check(self.lookahead >= 0, f"{key}.lookahead", self.lookahead, "use 0 (plain binary search) or more")


@dataclass
class CostConfig:
    model: CostKind = CostKind.FLOPS
    batch_size: int | None = None  # deployment batch; None: benchmark.batch_size
    seq_len: int | None = None  # deployment tokens (prompt included); None: the median dev batch's

    def __post_init__(self):
        key = "skeleton.cost"
        self.model = choice(CostKind, self.model, f"{key}.model")
        for name in ("batch_size", "seq_len"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{key}.{name}", value, "use null (from the run) or >= 1")


@dataclass
class ReconstructConfig:
    """Least-squares scales of the kept units and output shifts, fitted to the dense model's sublayer
    outputs on training examples (``localize/reconstruct.py``): no labels, no gradient steps. Off by
    default: on SST-2 it bought speed at a higher dev drop than plain pruning (README, Choices)."""

    enabled: bool = False
    instances: int = 256  # training examples whose tokens the fit is made on (the attribution sample)
    ridge: float = 0.01  # pulls the scales towards 1 (the plain pruned network), relative to their scale
    shift: bool = True  # also fit each sublayer's output bias (what the dropped units added on average)

    def __post_init__(self):
        key = "skeleton.reconstruct"
        check(self.instances >= 1, f"{key}.instances", self.instances, "fit on at least 1 instance")
        check(self.ridge >= 0, f"{key}.ridge", self.ridge, "use a ridge >= 0 (0: plain least squares)")


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
    "cost": CostConfig,
    "reconstruct": ReconstructConfig,
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
    cost: CostConfig = field(default_factory=CostConfig)
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
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
        if self.pruning.units.ranks_heads and not self.attribution.heads:
            raise ConfigError(
                f"skeleton.pruning.units={self.pruning.units.value} ranks heads with neurons and needs head scores: "
                "set skeleton.attribution.heads=true (or pruning.units=ffn)"
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
    if declared.endswith(" | None"):
        if value is None:
            return None
        declared = declared[: -len(" | None")]
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
