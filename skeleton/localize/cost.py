"""What a unit costs: a latency model of the backbone at the deployment shape.

Pruning what is many (FFN neurons) is not pruning what costs time: at short sequences an attention head
costs as much as dozens of neurons, and a sublayer with a few units left still pays its fixed overhead
(activation, softmax, kernel launches). The model here says, per layer, what one FFN neuron, one attention
head and the mere presence of each sublayer cost, so heads and neurons can be ranked together by score per
cost and the search can aim at latency rather than at a rate.

``measure_cost_model`` times the backbone itself (random inputs of the deployment batch size and length)
at a few uniform widths, interleaved, medians, and fits per-unit and fixed costs; ``flop_cost_model`` is
the analytic fallback where timing is impossible or unwanted. ``cached_cost_model`` keeps a measurement
per backbone shape, device, dtype, threads and deployment shape on disk, so it is paid once.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from skeleton.timing import OtherLoad, describe_load, interleaved_ms, machine_load, shared_cpu

from .arch import in_features, layer_parts
from .skip import attention_skippable

COST_FORMAT = 1  # bump when the measurement changes what it means


@dataclass
class CostModel:
    """Modelled latency = base + sum over layers of (fixed cost of each non-empty sublayer + per-unit cost
    x units kept). ``unit`` is "ms" (measured) or "MFLOP" (analytic). Per-layer lists; a head's cost is
    per query head (a key/value group of g heads costs g of them)."""

    kind: str  # "measured" | "flops"
    unit: str
    batch_size: int
    seq_len: int
    device: str
    base: float
    per_neuron: list[float]
    per_head: list[float]
    ffn_fixed: list[float]
    attn_fixed: list[float]
    dense_widths: list[int]
    dense_heads: list[int]

    def latency(self, widths: list[int], heads: list[int] | None = None) -> float:
        """Modelled latency of the backbone with these FFN widths and head counts (None: dense heads).
        Monotone: never less when a unit is added."""
        heads = self.dense_heads if heads is None else heads
        total = self.base
        for i, (w, h) in enumerate(zip(widths, heads)):
            total += (self.ffn_fixed[i] if w > 0 else 0.0) + self.per_neuron[i] * w
            total += (self.attn_fixed[i] if h > 0 else 0.0) + self.per_head[i] * h
        return total

    @property
    def dense(self) -> float:
        return self.latency(self.dense_widths, self.dense_heads)

    def speedup(self, widths: list[int], heads: list[int] | None = None) -> float:
        return self.dense / max(self.latency(widths, heads), 1e-12)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CostModel:
        return cls(**values)

    def summary(self) -> str:
        n = self.per_neuron[0] or 1e-12
        return (
            f"{self.kind} cost model at batch {self.batch_size} x {self.seq_len} tokens on {self.device}: "
            f"dense {self.dense:.3g} {self.unit}; one head costs {self.per_head[0] / n:.0f} neurons"
        )


def _shapes(backbone: nn.Module) -> tuple[list[int], list[int], list]:
    parts = layer_parts(backbone)
    return [p.ffn_width for p in parts], [p.attn.num_heads for p in parts], parts


def flop_cost_model(backbone: nn.Module, batch_size: int, seq_len: int) -> CostModel:
    """Forward MFLOPs per batch: a neuron is its rows of up (and gate) and column of down; a head is its
    q/k/v rows, output columns and its share of QK^T and AV. No fixed costs (FLOPs have none)."""
    widths, heads, parts = _shapes(backbone)
    tokens = batch_size * seq_len
    per_neuron, per_head = [], []
    for p in parts:
        d_model = in_features(p.up)
        mats = 3 if p.gate is not None else 2
        per_neuron.append(2 * tokens * d_model * mats / 1e6)
        group = max(p.attn.group_size, 1)
        qo = 2 * 2 * tokens * d_model * p.attn.head_dim  # q rows + out columns of one head
        kv = 2 * 2 * tokens * d_model * p.attn.head_dim / group  # k, v rows shared by the group
        scores = 2 * 2 * batch_size * seq_len * seq_len * p.attn.head_dim
        per_head.append((qo + kv + scores) / 1e6)
    zeros = [0.0] * len(parts)
    return CostModel(
        "flops", "MFLOP", batch_size, seq_len, "any", 0.0, per_neuron, per_head, zeros, zeros, widths, heads
    )


class _Forward(nn.Module):
    """``backbone(**batch)`` as ``module(batch)``, for the interleaved timer."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, batch: dict):
        return self.backbone(**batch)


def _uniform(backbone: nn.Module, width: int | None, heads: int | None) -> nn.Module:
    """A copy of ``backbone`` with every layer cut to ``width`` neurons / ``heads`` heads (whole groups)."""
    from .prune import prune_ffn, prune_heads

    twin = copy.deepcopy(backbone)
    parts = layer_parts(twin)
    if width is not None:
        prune_ffn(twin, [torch.arange(width) for _ in parts])
    if heads is not None:
        prune_heads(twin, [torch.arange(heads) for _ in parts])
    return twin


def measure_cost_model(
    backbone: nn.Module, batch_size: int, seq_len: int, *, repeats: int = 7, warmup: int = 2
) -> CostModel:
    """Time the backbone dense, at half and zero FFN width, and at half and zero (or one) heads per layer,
    then fit per layer: neuron cost = slope between full and half width, fixed cost = what remains at
    half width beyond the units, base = the rest (embeddings, norms). Slopes the noise made non-positive
    fall back to the FLOP model scaled to milliseconds."""
    widths, heads, parts = _shapes(backbone)
    if len(set(widths)) != 1 or len(set(heads)) != 1:
        raise ValueError("measure_cost_model needs a dense backbone whose layers all have one shape")
    n_layers, width, n_heads = len(parts), widths[0], heads[0]
    group = max(parts[0].attn.group_size, 1)
    half_heads = max(group, (n_heads // 2) // group * group)
    no_heads = 0 if all(attention_skippable(p) for p in parts) else group
    device = next(backbone.parameters()).device
    vocab = int(getattr(backbone.config, "vocab_size", 1000) or 1000)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(vocab, 1000), (batch_size, seq_len), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    variants = {
        "dense": (None, None),
        "ffn_half": (width // 2, None),
        "ffn_zero": (0, None),
        "heads_half": (None, half_heads),
        "heads_min": (None, no_heads),
    }
    models = {k: _Forward(_uniform(backbone, w, h)).eval() for k, (w, h) in variants.items()}
    sync = device.type == "cuda"
    with torch.inference_mode():
        calls = {k: functools.partial(m, batch) for k, m in models.items()}
        ms = {
            k: statistics.median(v)
            for k, v in interleaved_ms(calls, repeats=repeats, warmup=warmup, sync=sync).items()
        }
    del models, calls
    flops = flop_cost_model(backbone, batch_size, seq_len)
    ms_per_mflop = ms["dense"] / max(flops.dense, 1e-12)
    neuron = (ms["dense"] - ms["ffn_half"]) / (n_layers * (width - width // 2))
    if neuron <= 0:
        neuron = flops.per_neuron[0] * ms_per_mflop
    ffn_fixed = max((ms["ffn_half"] - ms["ffn_zero"]) / n_layers - neuron * (width // 2), 0.0)
    head = (ms["dense"] - ms["heads_half"]) / (n_layers * (n_heads - half_heads))
    if head <= 0:
        head = flops.per_head[0] * ms_per_mflop
    attn_fixed = max((ms["heads_half"] - ms["heads_min"]) / n_layers - head * (half_heads - no_heads), 0.0)
    per_layer = ffn_fixed + neuron * width + attn_fixed + head * n_heads
    base = max(ms["dense"] - n_layers * per_layer, 0.0)
    return CostModel(
        "measured",
        "ms",
        batch_size,
        seq_len,
        _device_name(device),
        base,
        [neuron] * n_layers,
        [head] * n_layers,
        [ffn_fixed] * n_layers,
        [attn_fixed] * n_layers,
        widths,
        heads,
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()}threads"


def cost_key(backbone: nn.Module, batch_size: int, seq_len: int) -> str:
    """Everything that changes a measurement: the architecture (config without weights or Skeleton's
    own fields), the current shapes, device, dtype, threads, torch version and the deployment shape."""
    config = {
        k: v for k, v in backbone.config.to_dict().items() if not k.startswith(("skeleton_", "_name_or_path"))
    }
    param = next(backbone.parameters())
    widths, heads, _ = _shapes(backbone)
    identity = {
        "config": config,
        "class": type(backbone).__name__,
        "widths": widths,
        "heads": heads,
        "device": _device_name(param.device),
        "dtype": str(param.dtype),
        "torch": torch.__version__,
        "shape": [batch_size, seq_len],
        "format": COST_FORMAT,
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


IDLE_PROBE_S = 0.5  # cost.model=auto: how long other processes' CPU share is read before timing


def cpu_busy(others: float | None) -> tuple[bool, str]:
    """Whether other work shared the CPU (``others``: ``OtherLoad``'s share, else the load average),
    and how that reads in a message."""
    load = machine_load()
    return shared_cpu(others, load), describe_load(others, load)


def cached_cost_model(
    backbone: nn.Module,
    batch_size: int,
    seq_len: int,
    *,
    kind: str = "measured",
    cache_dir: str | Path | None = None,
    report=print,
) -> CostModel:
    """The measured model from ``cache_dir/latency/<key>.json`` (measured and stored on a miss), or the
    FLOP model for ``kind="flops"``. ``kind="auto"``: the cached measurement if there is one, else a
    measurement if the machine is idle, else the FLOP model (a timing on a busy machine ranks by noise)."""
    if kind == "flops":
        return flop_cost_model(backbone, batch_size, seq_len)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir).expanduser() / "latency" / f"{cost_key(backbone, batch_size, seq_len)}.json"
        if path.exists():
            try:
                return CostModel.from_dict(json.loads(path.read_text()))
            except (ValueError, TypeError):
                report(f"WARNING: unreadable latency model {path}: measuring again")
    if kind == "auto":
        with OtherLoad() as idle:  # this process waits: whatever runs meanwhile is other work
            time.sleep(IDLE_PROBE_S)
        busy, why = cpu_busy(idle.value)
        if busy:
            report(
                f"the machine is busy ({why}): ranking by the FLOP model instead of timing "
                "(skeleton.cost.model=measured times anyway)"
            )
            return flop_cost_model(backbone, batch_size, seq_len)
    started = time.perf_counter()
    with OtherLoad() as during:
        model = measure_cost_model(backbone, batch_size, seq_len)
    busy, why = cpu_busy(during.value)
    where = f", kept in {path}" if path is not None and not busy else ""
    report(f"latency model measured in {time.perf_counter() - started:.1f}s{where}")
    if busy:
        report(
            f"WARNING: the latency model was measured on a busy machine ({why}): it ranks this run but is "
            "not cached; set skeleton.cost.model=flops for a ranking that does not depend on load"
        )
    if path is not None and not busy:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{id(model)}.tmp")
        tmp.write_text(json.dumps(model.to_dict(), indent=1))
        tmp.replace(path)
    return model
