"""Least-squares reconstruction of what the pruned units contributed: no training, no labels.

A sublayer's output is a sum of its units' contributions: FFN neuron ``i`` adds ``a_i * W_down[:, i]``,
attention head ``h`` adds ``W_out[:, h] @ ctx_h``. Dropping units removes their share, which the kept ones
partly carried too (units are correlated). So each kept unit gets a scale ``m_i`` and the sublayer an
output shift ``d``, fitted on the dense model's own activations over training examples:

    min_{m, d}  sum_t || sum_{i kept} m_i c_ti + d - sum_{j all} c_tj ||^2  +  ridge * ||m - 1||^2

(Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers": their mask tuning, here
with the ridge pulling towards the plain pruned network and a shift as in FLAP's bias compensation). It is a
linear solve per sublayer over sufficient statistics gathered in one dense pass (``Statistics``), so the
search fits every candidate rate in milliseconds and judges the network it will really ship. The scales
fold into the down / output projections' input columns and the shift into their bias (``compensate``):
the pruned model keeps its shapes and its speed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .arch import LayerParts, check_per_layer, head_channels, layer_parts, weight_out_in
from .masks import as_keep_mask

TENSOR_PREFIX = "comp."  # an artifact's compensation tensors: comp.<field>.<layer>
FIELDS = ("ffn_scale", "ffn_shift", "head_scale", "attn_shift")


@dataclass
class Statistics:
    """Sums over the calibration tokens of the dense model, per layer: all a least-squares fit needs."""

    ffn_gram: list[torch.Tensor]  # (W, W): sum_t a_t a_t^T of the down projection's input
    ffn_sum: list[torch.Tensor]  # (W,): sum_t a_t
    down_weight: list[torch.Tensor]  # (d, W): the down projection, (out, in), float64
    head_gram: list[torch.Tensor]  # (H, H): sum_t <c_th, c_tg>, c_th = head h's output contribution
    head_sum: list[torch.Tensor]  # (H, d): sum_t c_th
    down_bias: list[bool]  # whether the down projection has a bias to carry a shift
    out_bias: list[bool]  # the same for the attention output projection
    tokens: int = 0
    _ffn: dict = field(default_factory=dict, repr=False)  # per layer: the fit's rate-independent products

    def ffn_products(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's neuron contribution Gram matrix (activations' Gram times the down projection's) and
        what the tokens' mean takes out of it: the same for every candidate rate, so made once."""
        if i not in self._ffn:
            down_gram = self.down_weight[i].T @ self.down_weight[i]
            mean = self.ffn_sum[i] / max(self.tokens, 1)
            self._ffn[i] = (self.ffn_gram[i] * down_gram, torch.outer(mean, mean) * self.tokens * down_gram)
        return self._ffn[i]

    def reduced(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Statistics:
        """Summed over ranks (a distributed run gathers its shards' sums)."""
        sums = {
            name: [reduce(t) for t in getattr(self, name)]
            for name in ("ffn_gram", "ffn_sum", "head_gram", "head_sum")
        }
        tokens = int(reduce(torch.tensor(float(self.tokens), dtype=torch.float64)).item())
        return Statistics(
            **sums,
            down_weight=self.down_weight,
            down_bias=self.down_bias,
            out_bias=self.out_bias,
            tokens=tokens,
        )


@dataclass
class Compensation:
    """Per layer: a scale per kept neuron and per kept head (in kept-index order), and the output shifts
    of the FFN and of the attention block (None where the projection has no bias to hold one)."""

    ffn_scale: list[torch.Tensor]
    ffn_shift: list[torch.Tensor | None]
    head_scale: list[torch.Tensor]
    attn_shift: list[torch.Tensor | None]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in FIELDS:
            for i, t in enumerate(getattr(self, name)):
                if t is not None:
                    out[f"{TENSOR_PREFIX}{name}.{i}"] = t.detach().float().cpu().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], num_layers: int) -> Compensation | None:
        """The compensation an artifact stores, or None for an artifact without one."""
        if not any(k.startswith(TENSOR_PREFIX) for k in tensors):
            return None
        return cls(
            **{
                name: [tensors.get(f"{TENSOR_PREFIX}{name}.{i}") for i in range(num_layers)]
                for name in FIELDS
            }
        )


# ---- statistics ------------------------------------------------------------------------------------
def _gram_hooks(parts: list[LayerParts], stats: Statistics, state: dict) -> list:
    def tokens(x: torch.Tensor) -> torch.Tensor:
        mask = state["mask"]
        if mask is not None and mask.shape == x.shape[:2]:
            return x[mask.to(x.device)].float()
        return x.reshape(-1, x.shape[-1]).float()

    def ffn(i: int):
        def hook(module, args):
            a = tokens(args[0])
            stats.ffn_gram[i] += (a.T @ a).double().cpu()
            stats.ffn_sum[i] += a.sum(0).double().cpu()
            if i == 0:
                stats.tokens += a.shape[0]

        return hook

    def heads(i: int, p: LayerParts):
        w = weight_out_in(p.attn.out).detach().float()  # (d, H * head_dim)
        per_head = w.view(w.shape[0], -1, p.attn.head_dim)  # (d, H, head_dim)

        def hook(module, args):
            x = tokens(args[0])
            c = torch.einsum("nhk,dhk->nhd", x.view(len(x), -1, p.attn.head_dim), per_head)
            stats.head_gram[i] += torch.einsum("nhd,ngd->hg", c, c).double().cpu()
            stats.head_sum[i] += c.sum(0).double().cpu()

        return hook

    handles = []
    for i, p in enumerate(parts):
        handles.append(p.down.register_forward_pre_hook(ffn(i)))
        handles.append(p.attn.out.register_forward_pre_hook(heads(i, p)))
    return handles


def _empty_statistics(parts: list[LayerParts]) -> Statistics:
    f64 = torch.float64
    downs = [weight_out_in(p.down).detach().double().cpu() for p in parts]
    return Statistics(
        ffn_gram=[torch.zeros(p.ffn_width, p.ffn_width, dtype=f64) for p in parts],
        ffn_sum=[torch.zeros(p.ffn_width, dtype=f64) for p in parts],
        down_weight=downs,
        head_gram=[torch.zeros(p.attn.num_heads, p.attn.num_heads, dtype=f64) for p in parts],
        head_sum=[torch.zeros(p.attn.num_heads, d.shape[0], dtype=f64) for p, d in zip(parts, downs)],
        down_bias=[getattr(p.down, "bias", None) is not None for p in parts],
        out_bias=[getattr(p.attn.out, "bias", None) is not None for p in parts],
    )


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    max_instances: int,
    include_prompt: bool = True,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Statistics:
    """One pass of the dense ``model`` over ``batches`` (up to ``max_instances`` rows): the Gram matrices
    of every FFN's and attention block's unit contributions. Padding never counts; soft-prompt positions
    count when ``include_prompt`` (pruning removes the units there too)."""
    parts = layer_parts(model.backbone)
    stats, state = _empty_statistics(parts), {"mask": None}
    handles = _gram_hooks(parts, stats, state)
    seen = 0
    try:
        for batch in batches:
            if seen >= max_instances:
                break
            take = min(max_instances - seen, len(batch["input_ids"]))
            batch = {k: v[:take] if torch.is_tensor(v) and len(v) == len(batch["input_ids"]) else v
                     for k, v in batch.items()}  # fmt: skip
            content = getattr(model, "content_mask", None)
            state["mask"] = content(batch, include_prompt=include_prompt) if content else None
            model(batch)
            seen += take
    finally:
        for h in handles:
            h.remove()
    return stats.reduced(reduce) if reduce is not None else stats


# ---- the fit ---------------------------------------------------------------------------------------
def _fit(gram: torch.Tensor, centre: torch.Tensor | None, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """Scales over all of one sublayer's units (zero where dropped). ``gram``: the units' contribution Gram
    matrix over the tokens; ``centre``: what the tokens' mean takes out of it when the fit has a free
    shift (None: no shift). The ridge pulls the scales towards 1, the plain pruned network."""
    if centre is not None:
        gram = gram - centre
    scales = torch.zeros(gram.shape[0], dtype=torch.float64)
    if len(keep) == 0:
        return scales
    a = gram[keep][:, keep]
    b = gram[keep].sum(1)
    damp = ridge * float(a.diagonal().mean().clamp(min=0)) + 1e-12
    a = a + damp * torch.eye(len(keep), dtype=a.dtype)
    try:
        scales[keep] = torch.linalg.solve(a, b + damp)
    except RuntimeError:  # singular even when damped (all-zero units): least squares needs no full rank
        scales[keep] = torch.linalg.lstsq(a, (b + damp).unsqueeze(1)).solution.view(-1)
    return scales


def _indices(keep: torch.Tensor | None, width: int) -> torch.Tensor:
    """Sorted kept indices, the order slicing keeps the units in."""
    return as_keep_mask(keep, width).nonzero().view(-1)


def fit_compensation(
    stats: Statistics,
    keep_ffn: Sequence[torch.Tensor | None],
    keep_heads: Sequence[torch.Tensor | None] | None,
    *,
    ridge: float = 0.01,
    shift: bool = True,
) -> Compensation:
    """The least-squares scales of the kept neurons and heads (per layer, in kept-index order) and the
    output shifts that best reproduce each dense sublayer's output on the calibration tokens. A sublayer
    that keeps every unit is left exactly as it is (scales 1, no shift)."""
    check_per_layer(keep_ffn, len(stats.ffn_gram), "keep_ffn")
    n = max(stats.tokens, 1)
    out = Compensation([], [], [], [])
    for i, down in enumerate(stats.down_weight):
        kf = _indices(keep_ffn[i], down.shape[1])
        if len(kf) == down.shape[1]:
            out.ffn_scale.append(torch.ones(len(kf)))
            out.ffn_shift.append(None)
        else:
            gram, centre = stats.ffn_products(i)
            mean = stats.ffn_sum[i] / n
            with_shift = shift and stats.down_bias[i]
            scales = _fit(gram, centre if with_shift else None, kf, ridge)
            out.ffn_scale.append(scales[kf].float())
            out.ffn_shift.append((down @ (mean * (1 - scales))).float() if with_shift else None)

        heads = stats.head_gram[i].shape[0]
        kh = _indices(None if keep_heads is None else keep_heads[i], heads)
        if len(kh) == heads:
            out.head_scale.append(torch.ones(len(kh)))
            out.attn_shift.append(None)
            continue
        head_mean = stats.head_sum[i] / n  # (H, d): each head's mean contribution
        with_shift = shift and stats.out_bias[i]
        centre = head_mean @ head_mean.T * n if with_shift else None
        scales = _fit(stats.head_gram[i], centre, kh, ridge)
        out.head_scale.append(scales[kh].float())
        out.attn_shift.append(((1 - scales)[:, None] * head_mean).sum(0).float() if with_shift else None)
    return out


# ---- applying it -----------------------------------------------------------------------------------
def _scaled_input_columns(m: nn.Module, scale: torch.Tensor) -> None:
    """Multiply a projection's input channels by ``scale``: a new Parameter (a shared one stays as it is)."""
    w = m.weight.detach()
    scale = scale.to(device=w.device, dtype=w.dtype)
    data = w * scale[:, None] if isinstance(m, Conv1D) else w * scale[None, :]
    m.weight = nn.Parameter(data.contiguous(), requires_grad=m.weight.requires_grad)


def _shifted_bias(m: nn.Module, shift: torch.Tensor) -> None:
    b = m.bias.detach()
    m.bias = nn.Parameter(b + shift.to(device=b.device, dtype=b.dtype), requires_grad=m.bias.requires_grad)


@torch.no_grad()
def compensate(backbone: nn.Module, comp: Compensation) -> None:
    """Fold ``comp`` into a backbone already pruned to its kept units: scales into the down / output
    projections' input columns, shifts into their biases. New Parameters replace the old ones, so a
    serving view never writes into the weights it shares with the dense backbone."""
    parts = layer_parts(backbone)
    check_per_layer(comp.ffn_scale, len(parts), "the compensation")
    for i, p in enumerate(parts):
        if len(comp.ffn_scale[i]) != p.ffn_width or len(comp.head_scale[i]) != p.attn.num_heads:
            raise ValueError(
                f"layer {i}: the compensation has {len(comp.ffn_scale[i])} neuron and "
                f"{len(comp.head_scale[i])} head scales but the backbone keeps {p.ffn_width} neurons and "
                f"{p.attn.num_heads} heads: prune with the same kept indices first"
            )
        if p.ffn_width and not bool((comp.ffn_scale[i] == 1).all()):
            _scaled_input_columns(p.down, comp.ffn_scale[i])
        if p.attn.num_heads and not bool((comp.head_scale[i] == 1).all()):
            _scaled_input_columns(p.attn.out, comp.head_scale[i].repeat_interleave(p.attn.head_dim))
        if comp.ffn_shift[i] is not None:
            _shifted_bias(p.down, comp.ffn_shift[i])
        if comp.attn_shift[i] is not None:
            _shifted_bias(p.attn.out, comp.attn_shift[i])


@contextmanager
def compensated_masks(
    backbone: nn.Module,
    keep_ffn: Sequence[torch.Tensor | None],
    keep_heads: Sequence[torch.Tensor | None] | None,
    comp: Compensation,
):
    """The pruned and compensated network as hooks on the dense backbone (nothing copied): for families
    whose slicing cannot take what was chosen, and as the reference the sliced network must equal."""
    parts = layer_parts(backbone)
    handles = []

    def times(vector: torch.Tensor):
        return lambda module, args: (args[0] * vector.to(args[0].device, args[0].dtype), *args[1:])

    def plus(shift: torch.Tensor):
        return lambda module, args, out: out + shift.to(out.device, out.dtype)

    try:
        for i, p in enumerate(parts):
            ffn = torch.zeros(p.ffn_width)
            ffn[_indices(keep_ffn[i], p.ffn_width)] = comp.ffn_scale[i].float()
            kept = _indices(None if keep_heads is None else keep_heads[i], p.attn.num_heads)
            heads = torch.zeros(p.attn.num_heads * p.attn.head_dim)
            heads[head_channels(kept, p.attn.head_dim)] = (
                comp.head_scale[i].float().repeat_interleave(p.attn.head_dim)
            )
            handles.append(p.down.register_forward_pre_hook(times(ffn)))
            handles.append(p.attn.out.register_forward_pre_hook(times(heads)))
            if comp.ffn_shift[i] is not None:
                handles.append(p.down.register_forward_hook(plus(comp.ffn_shift[i])))
            if comp.attn_shift[i] is not None:
                handles.append(p.attn.out.register_forward_hook(plus(comp.attn_shift[i])))
        yield backbone
    finally:
        for h in handles:
            h.remove()
