"""Score FFN neurons (and optionally attention heads) by how much the task's prediction depends on them.

One entry point, `score_neurons`, for every criterion:

- "attribution" (default): activation x gradient, A * dT/dA, the first-order Taylor estimate of how much
  the target T changes when the neuron is zeroed (which is what pruning does).
- "activation": A alone; "gradient": dT/dA alone.
- "magnitude": weight norms only, no data (||up row|| * ||gate row|| * ||down column||).
- "random": seeded uniform, the control baseline.

A is the input of each layer's down projection (R rows, T positions, d_ff channels), captured by forward
pre-hooks; its gradient comes from `torch.autograd.grad` on the captured tensors, so backbone parameters may
all have requires_grad=False and no parameter `.grad` is touched.

Aggregation (per backbone row r, over the positions where `model.content_mask(batch, include_prompt)` is
True: padding never counts, the soft-prompt positions only with include_prompt=True, the
default):
    magnitude="instance": |agg_t s[r, t, j]|      magnitude="token" (default): agg_t |s[r, t, j]|
with agg = token_agg in {"mean" (default), "max", "sum"}; then the mean over rows, accumulated as float64
running sums so memory stays bounded whatever the number of batches. Signed scores are not offered as the
default because neurons with large negative contributions are as task-relevant as positive ones
(ranking by signed attribution collapsed to chance in our runs). `iterative.score_iteratively` repeats
the scoring under the mask of the neurons dropped so far.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .arch import LayerParts, head_channels, layer_parts, weight_out_in
from .config import AttributionConfig, Criterion, Magnitude, Target, TokenAgg

CRITERIA = tuple(c.value for c in Criterion)
TARGETS = tuple(t.value for t in Target)
TOKEN_AGGS = tuple(a.value for a in TokenAgg)
MAGNITUDES = tuple(m.value for m in Magnitude)
DEFAULTS = AttributionConfig()  # score_neurons' defaults are the config's: one set of defaults
FORMULATIONS = ("classification", "regression", "multiple_choice")


@dataclass
class Scores:
    """Per-layer neuron scores (higher = more task-relevant).

    ffn: one (d_ff_l,) float32 tensor per layer. heads: one (num_heads_l,) tensor per layer, or None.
    num_instances: backbone rows (sequences) averaged over (0 for data-free criteria). meta: the settings.
    """

    ffn: list[torch.Tensor]
    heads: list[torch.Tensor] | None = None
    num_instances: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def widths(self) -> list[int]:
        return [len(s) for s in self.ffn]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (JSON/YAML friendly)."""
        return {
            "ffn": [s.tolist() for s in self.ffn],
            "heads": None if self.heads is None else [s.tolist() for s in self.heads],
            "num_instances": self.num_instances,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scores:
        heads = d.get("heads")
        return cls(
            ffn=[torch.tensor(s, dtype=torch.float32) for s in d["ffn"]],
            heads=None if heads is None else [torch.tensor(s, dtype=torch.float32) for s in heads],
            num_instances=int(d.get("num_instances", 0)),
            meta=dict(d.get("meta", {})),
        )

    def state(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor dict for `safetensors.torch.save_file` (pair it with `metadata()`)."""
        out = {f"ffn.{i}": s.contiguous() for i, s in enumerate(self.ffn)}
        for i, s in enumerate(self.heads or []):
            out[f"heads.{i}"] = s.contiguous()
        out["num_instances"] = torch.tensor([self.num_instances], dtype=torch.int64)
        return out

    def metadata(self) -> dict[str, str]:
        """safetensors metadata (str -> str): the settings as JSON."""
        return {"meta": json.dumps(self.meta)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Scores:
        def layers(prefix: str) -> list[torch.Tensor]:
            n = sum(k.startswith(prefix + ".") for k in state)
            return [state[f"{prefix}.{i}"] for i in range(n)]

        heads = layers("heads")
        meta = json.loads(metadata["meta"]) if metadata and "meta" in metadata else {}
        n = int(state["num_instances"].view(-1)[0]) if "num_instances" in state else 0
        return cls(layers("ffn"), heads or None, n, meta)

    def save(self, path: str) -> None:
        save_file(self.state(), path, metadata=self.metadata())

    @classmethod
    def load(cls, path: str) -> Scores:
        with safe_open(path, framework="pt") as f:
            return cls.from_state({k: f.get_tensor(k) for k in f.keys()}, f.metadata())  # noqa: SIM118


class ScoreAccumulator:
    """Running float64 sums of per-row scores and the row count, kept until `finalize`.

    Splitting sums from the division is what makes multi-process scoring exact: each rank accumulates its
    shard, `finalize(reduce_fn=all_reduce_sum)` adds sums and counts across ranks, then divides.
    """

    def __init__(self, widths: list[int], head_counts: list[int] | None = None, device=None):
        # Sums live on the model's device: no host sync per batch, and NCCL all_reduce needs GPU tensors.
        device = torch.device(device or "cpu")
        kw = {"dtype": torch.float32 if device.type == "mps" else torch.float64, "device": device}
        self.ffn = [torch.zeros(w, **kw) for w in widths]
        self.heads = None if head_counts is None else [torch.zeros(h, **kw) for h in head_counts]
        self.count = torch.zeros((), **kw)

    def add(self, ffn_rows: list[torch.Tensor], head_rows: list[torch.Tensor] | None = None) -> None:
        """Add per-row scores: one (R, d_l) tensor per layer (same R for all layers)."""
        for acc, rows in zip(self.ffn, ffn_rows):
            acc += rows.to(acc).sum(0)
        for acc, rows in zip(self.heads or [], head_rows or []):
            acc += rows.to(acc).sum(0)
        self.count += ffn_rows[0].shape[0] if ffn_rows else 0

    def finalize(
        self, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, meta: dict | None = None
    ) -> Scores:
        red = reduce_fn or (lambda t: t)
        ffn = [red(s) for s in self.ffn]
        heads = None if self.heads is None else [red(s) for s in self.heads]
        count = red(self.count)
        n = float(count)
        div = max(n, 1.0)
        return Scores(
            ffn=[(s.cpu() / div).float() for s in ffn],
            heads=None if heads is None else [(s.cpu() / div).float() for s in heads],
            num_instances=round(n),
            meta=dict(meta or {}),
        )


# ----------------------------------------------------------------------------------------------------------
# Data-free criteria


def magnitude_scores(parts: list[LayerParts], heads: bool = False) -> tuple[list, list | None]:
    """Weight-magnitude ranking. FFN neuron j: ||up_j|| * ||gate_j|| (gated MLPs) * ||down_:,j||, the size
    of the path through the neuron. Head h: ||W_v rows of h||_F * ||W_o columns of h||_F, the size of its
    value-to-output path (q/k only move attention weights, which are bounded)."""
    ffn = []
    for p in parts:
        s = weight_out_in(p.up).detach().float().norm(dim=1)
        if p.gate is not None:
            s = s * weight_out_in(p.gate).detach().float().norm(dim=1)
        ffn.append((s * weight_out_in(p.down).detach().float().norm(dim=0)).cpu())
    if not heads:
        return ffn, None
    out = []
    for p in parts:
        a = p.attn
        if a.qkv is not None:
            wq = weight_out_in(a.qkv)
            v_rows = wq[2 * (wq.shape[0] // 3) :]
        else:
            v_rows = weight_out_in(a.v)
        kv = a.num_kv_heads or a.num_heads
        wo = weight_out_in(a.out)
        s = []
        for h in range(a.num_heads):
            g = h // (a.num_heads // kv)
            ch = head_channels(torch.tensor([h]), a.head_dim)
            vh = v_rows[g * a.head_dim : (g + 1) * a.head_dim]
            s.append(vh.detach().float().norm() * wo[:, ch.to(wo.device)].detach().float().norm())
        out.append(torch.stack(s).cpu())
    return ffn, out


def random_scores(parts: list[LayerParts], heads: bool, seed: int) -> tuple[list, list | None]:
    """Seeded uniform scores: the same seed always gives the same ranking (FFN layers first, then heads)."""
    g = torch.Generator().manual_seed(seed)
    ffn = [torch.rand(p.ffn_width, generator=g) for p in parts]
    return ffn, ([torch.rand(p.attn.num_heads, generator=g) for p in parts] if heads else None)


# ----------------------------------------------------------------------------------------------------------
# Data-driven criteria


class _Capture:
    """Forward pre-hooks that keep the inputs of the down projections (and attention output projections).

    If the input does not require grad (frozen backbone, no trainable prompt upstream), it is replaced by a
    detached leaf that does, so the graph from that point on exists and autograd.grad can reach it. Only the
    part of the graph upstream of the first hooked point is lost, and no score needs it.

    A module called several times per forward (a layer whose weights several layers share, as in ALBERT)
    keeps every call's input: its scores are the sum over the calls, one joint score per shared unit.
    """

    def __init__(self, modules: list[nn.Module]):
        self.tensors: list[list[torch.Tensor]] = [[] for _ in modules]
        self.grad = False
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple):
            x = args[0]
            if self.grad and not x.requires_grad:
                x = x.detach().requires_grad_(True)
            self.tensors[i].append(x)
            return (x, *args[1:])

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _gold(logits: torch.Tensor, batch: dict, unsupervised: bool) -> torch.Tensor:
    pred = logits.detach().argmax(-1)
    if unsupervised or "labels" not in batch:
        return pred
    y = batch["labels"].to(logits.device).long().view(-1)
    return torch.where(y < 0, pred, y)  # unlabeled rows (label -1 / -100) fall back to the prediction


def task_target(logits: torch.Tensor, batch: dict, formulation: str, target: str, unsupervised: bool = False):
    """Per-example scalar whose gradient defines the attribution, shape (B,).

    classification / multiple_choice: "logit" = gold class (choice) logit; "logprob" = its log-softmax;
    "loss" = minus the cross-entropy, which equals "logprob" for these formulations. regression: "logit" =
    the prediction itself; "loss" = -(pred - y)^2; "logprob" = -(pred - y)^2 / 2 (unit Gaussian), which
    ranks identically to "loss". unsupervised=True replaces gold labels by the model's own prediction
    (argmax; for regression y = pred, so only target="logit" is informative).
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"task_formulation must be one of {FORMULATIONS}, got {formulation!r}")
    if formulation == "regression":
        pred = logits.reshape(logits.shape[0], -1)[:, 0]
        if target == "logit":
            return pred
        y = pred.detach() if unsupervised or "labels" not in batch else batch["labels"].to(pred).view(-1)
        sq = (pred.float() - y.float()) ** 2
        return -sq if target == "loss" else -0.5 * sq
    y = _gold(logits, batch, unsupervised)
    if target == "logit":
        return logits.gather(1, y[:, None])[:, 0]
    return F.log_softmax(logits.float(), dim=-1).gather(1, y[:, None])[:, 0]


def _aggregate(s: torch.Tensor, mask: torch.Tensor, token_agg: str, magnitude: str) -> torch.Tensor:
    """(R, T, d) per-token scores, (R, T) bool content mask -> (R, d) per-row scores."""
    if magnitude == "token":
        s = s.abs()
    m = mask.unsqueeze(-1)
    if token_agg == "max":
        out = s.masked_fill(~m, -math.inf).amax(1)
        out = torch.where(mask.any(1, keepdim=True), out, torch.zeros_like(out))
    else:
        out = s.masked_fill(~m, 0.0).sum(1)
        if token_agg == "mean":
            out = out / mask.sum(1, keepdim=True).clamp_min(1)
    return out.abs() if magnitude == "instance" else out


def _content_mask(model: nn.Module, batch: dict, include_prompt: bool = False) -> torch.Tensor:
    if hasattr(model, "content_mask"):
        if include_prompt:
            return model.content_mask(batch, include_prompt=True).bool()
        return model.content_mask(batch).bool()
    return batch["attention_mask"].bool()


def _to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.clone() if v.is_inference() else v  # inference-mode tensors cannot enter autograd
            v = v.to(device)
        out[k] = v
    return out


def _per_token(criterion: str, a: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    a = a.detach().float()
    if criterion == "activation":
        return a
    g = torch.zeros_like(a) if g is None else g.detach().float()
    return g if criterion == "gradient" else a * g


def _score_batch(model, batch, capture, points, n_ffn, opts) -> tuple[list, list]:
    need_grad = opts["criterion"] != "activation"
    capture.grad = need_grad
    capture.tensors = [[] for _ in points]
    with torch.set_grad_enabled(need_grad):
        logits = model(batch)
        mask = _content_mask(model, batch, opts.get("include_prompt", False))
        calls = capture.tensors
        if any(not c for c in calls):
            raise RuntimeError("a hooked projection was not called in the forward; is model.backbone used?")
        acts = [a for c in calls for a in c]
        grads: tuple = (None,) * len(acts)
        if need_grad:
            tgt = task_target(logits, batch, opts["task_formulation"], opts["target"], opts["unsupervised"])
            grads = torch.autograd.grad(tgt.sum(), acts, allow_unused=True)
    capture.tensors = [[] for _ in points]
    rows: list[torch.Tensor] = []
    start = 0
    for i, c in enumerate(calls):
        head_dim = points[i][1] if i >= n_ffn else None
        pairs = zip(acts[start : start + len(c)], grads[start : start + len(c)])
        rows.append(sum(_row_scores(a, g, mask, head_dim, opts) for a, g in pairs))
        start += len(c)
    return rows[:n_ffn], rows[n_ffn:]


def _row_scores(a, g, mask, head_dim: int | None, opts) -> torch.Tensor:
    """(R, d) scores of one call of a hooked point; per head when `head_dim` is given."""
    if a.shape[:2] != mask.shape:
        raise ValueError(
            f"content_mask has shape {tuple(mask.shape)} but the backbone sees {tuple(a.shape[:2])} "
            "(rows, positions); content_mask must cover soft-prompt positions too"
        )
    s = _per_token(opts["criterion"], a, g)
    mask = mask.to(s.device)
    if head_dim is not None and opts.get("head_score", "signed") == "channels":
        # each channel aggregated as a neuron's activation is, then summed: the head as the neurons it is
        channels = _aggregate(s, mask, opts["token_agg"], opts["magnitude"])
        return channels.view(channels.shape[0], -1, head_dim).sum(-1)
    if head_dim is not None:  # attention head point: sum the per-channel scores of each head
        s = s.view(*s.shape[:2], -1, head_dim).sum(-1)
    return _aggregate(s, mask, opts["token_agg"], opts["magnitude"])


def _check(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def score_neurons(
    model: nn.Module,
    batches: Iterable[dict] | None,
    *,
    criterion: str = DEFAULTS.criterion,
    target: str = DEFAULTS.target,
    token_agg: str = DEFAULTS.token_agg,
    magnitude: str = DEFAULTS.magnitude,
    max_instances: int | None = None,
    unsupervised: bool = DEFAULTS.unsupervised,
    include_prompt: bool = DEFAULTS.include_prompt,
    heads: bool = DEFAULTS.heads,
    head_score: str = DEFAULTS.head_score,
    seed: int = 0,
    progress: Callable[[int, int | None], None] | None = None,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Scores:
    """Score every FFN neuron (and attention head if heads=True) of `model.backbone` on `batches`.

    model: a localizable model (`.backbone`, `model(batch) -> logits`, `.content_mask(batch)`,
        `.task_formulation`; see the module docstring). Run in eval mode (dropout off) for the duration;
        each submodule's train/eval flag is restored afterwards. Works under an outer torch.no_grad() or
        inference_mode() (both are lifted locally).
    batches: iterable of batch dicts (moved to the model's device); ignored for "magnitude" and "random".
    max_instances: stop after this many backbone rows (sequences; multiple-choice examples contribute one
        row per choice); the last batch is cut at that row. Per process when used with DDP.
    heads: also score attention heads at the input of the attention output projection; the per-token head
        score is the sum over the head's head_dim channels of the per-channel score (for act x grad that is
        the Taylor estimate of removing the whole head), then aggregated like neurons.
    progress: called as progress(rows_done, max_instances) after each batch.
    reduce_fn: applied to every running-sum tensor and to the row count before dividing (e.g. an
        all_reduce SUM across DDP ranks), so the mean is over all ranks' rows.
    See `task_target` for `target` / `unsupervised` and the module docstring for the aggregation.
    """
    _check("criterion", criterion, CRITERIA)
    _check("target", target, TARGETS)
    _check("token_agg", token_agg, TOKEN_AGGS)
    _check("magnitude", magnitude, MAGNITUDES)
    if max_instances is not None and max_instances < 0:
        raise ValueError("max_instances must be >= 0 or None")
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ValueError("model must expose the Hugging Face model it wraps as `.backbone`")
    parts = layer_parts(backbone)
    formulation = getattr(model, "task_formulation", "classification")
    meta = {
        "criterion": str(criterion),
        "target": str(target),
        "token_agg": str(token_agg),
        "magnitude": str(magnitude),
        "max_instances": max_instances,
        "unsupervised": unsupervised,
        "include_prompt": include_prompt,
        "heads": heads,
        "head_score": str(head_score),
        "seed": seed,
        "task_formulation": formulation,
        "model_type": getattr(backbone.config, "model_type", None),
    }
    if heads:  # query heads per key/value head: select_heads keeps grouped-query groups whole
        meta["head_groups"] = [p.attn.group_size for p in parts]
    if criterion in ("magnitude", "random"):
        ffn, hs = (
            magnitude_scores(parts, heads) if criterion == "magnitude" else random_scores(parts, heads, seed)
        )
        return Scores(ffn, hs, 0, meta)

    points = [(p.down, None) for p in parts] + (
        [(p.attn.out, p.attn.head_dim) for p in parts] if heads else []
    )
    flags = {m: m.training for m in model.modules()}
    model.eval()
    capture = _Capture([m for m, _ in points])
    try:
        with torch.inference_mode(False):
            device = next(backbone.parameters()).device
            acc = ScoreAccumulator(
                [p.ffn_width for p in parts], [p.attn.num_heads for p in parts] if heads else None, device
            )
            _accumulate(model, batches or [], acc, capture, points, len(parts), meta, max_instances, progress)
            return acc.finalize(reduce_fn, meta)
    finally:
        capture.remove()
        for m, t in flags.items():
            m.training = t


def _accumulate(model, batches, acc, capture, points, n_ffn, opts, max_instances, progress) -> None:
    """Score batches into `acc` until they run out or `max_instances` rows are in (never pulling a batch
    more than needed, so a stream can be shared with other consumers)."""
    device = next(model.backbone.parameters()).device
    done = 0
    if max_instances == 0:
        return
    for batch in batches:
        ffn_rows, head_rows = _score_batch(model, _to_device(batch, device), capture, points, n_ffn, opts)
        if max_instances is not None:
            ffn_rows = [r[: max_instances - done] for r in ffn_rows]
            head_rows = [r[: max_instances - done] for r in head_rows]
        acc.add(ffn_rows, head_rows)
        done += ffn_rows[0].shape[0]
        if progress is not None:
            progress(done, max_instances)
        if max_instances is not None and done >= max_instances:
            break
