"""Deep prompts (``prompt=deep``, P-tuning v2 style): trainable vectors at every layer's input.

The input prompt puts ``n`` soft tokens at positions ``0..n-1``; a deep prompt also replaces the hidden
states at those positions at the input of every later layer ``1..L-1`` with vectors of their own, so
each layer reads prompt vectors that training chose for it, not what the layer below made of the
input prompt.

Why layer inputs and not prefix keys/values (P-tuning v2's form): the layer list is all it needs,
which every adapter (registered, inferred or a user's) already knows, so it works for every family
with no per-family attention code; rotary and absolute positions need no special case (the prompt
keeps its positions); the hidden size never shrinks, so FFN and head pruning leave the vectors
untouched (prefix keys/values would have to be sliced with every pruned head and key/value group).
It is a little less expressive per token: keys and values of a position come from one vector.

The vectors start as the backbone's own layer inputs at the prompt positions for the input prompt
alone (for a causal decoder that is exactly what the input-only prompt gives, whatever the text), so
training starts from the scale each layer expects.

``reparam > 0`` trains them through an MLP over prompt embeddings of their own, ``vectors = start +
MLP(E)`` (last layer zero-initialised, so it starts at ``start``), as prefix-tuning and P-tuning v2
do. The MLP is folded away when training ends (``fold``): the state dict, hence every checkpoint,
cache entry and artifact, holds only ``prompt.deep.vectors``, and loading that into a model that is
still reparameterised folds it first.

The replacement is a forward pre-hook on each layer module, installed once and idle except inside
``DeepPrompt.applied`` (a context variable carries the active vectors, so threads serving different
tasks on shared layers never see each other's prompt). Layers are counted by call, so a layer module
that several layers share (ALBERT) gets one vector per call.
"""

from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar

import torch
from torch import nn

from skeleton.localize.arch import UnsupportedArchitectureError, get_layers


class DeepPromptError(ValueError):
    """A backbone a deep prompt cannot be put into (no known layer list, a single layer)."""


def check_config(cfg) -> None:
    """The deep-prompt keys of a PromptConfig, checked when it is built (before any model or data)."""
    if not isinstance(cfg.deep, bool):
        raise ValueError(f"prompt.deep must be true or false, got {cfg.deep!r}")
    if isinstance(cfg.reparam, bool) or not isinstance(cfg.reparam, int) or cfg.reparam < 0:
        raise ValueError(
            f"prompt.reparam must be an integer >= 0 (the hidden width of the MLP that trains the deep "
            f"prompt; 0 = off), got {cfg.reparam!r}"
        )
    if cfg.reparam and not cfg.deep:
        raise ValueError(
            f"prompt.reparam={cfg.reparam} reparameterises deep prompts only: set prompt.deep=true "
            "(prompt=deep) or prompt.reparam=0"
        )
    if (
        isinstance(cfg.reparam_lr, bool)
        or not isinstance(cfg.reparam_lr, (int, float))
        or cfg.reparam_lr <= 0
    ):
        raise ValueError(f"prompt.reparam_lr must be a number > 0, got {cfg.reparam_lr!r}")


class _Pass:
    """One forward pass: the vectors to put in (or None: record the layer inputs) and calls so far."""

    def __init__(self, vectors: torch.Tensor | None, num_tokens: int):
        self.vectors, self.n, self.calls, self.recorded = vectors, num_tokens, 0, []


_ACTIVE: ContextVar[_Pass | None] = ContextVar("skeleton_deep_prompt", default=None)
_INSTALL = threading.Lock()


def _hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, str | int]:
    if args and torch.is_tensor(args[0]):
        return args[0], 0
    if torch.is_tensor(kwargs.get("hidden_states")):
        return kwargs["hidden_states"], "hidden_states"
    raise TypeError("a layer was called without its hidden states as first argument or hidden_states=")


def _layer_hook(module: nn.Module, args: tuple, kwargs: dict):
    active = _ACTIVE.get()
    if active is None:  # not inside DeepPrompt.applied: the backbone runs as it always did
        return None
    index = active.calls
    active.calls += 1
    hidden, where = _hidden_of(args, kwargs)
    if active.vectors is None:
        active.recorded.append(hidden[0, : active.n].detach().float().clone())
        return None
    if index == 0:  # the first layer reads the input prompt, as without deep prompts
        return None
    if index > len(active.vectors):
        raise RuntimeError(
            f"the backbone called {index + 1} layers but the deep prompt has vectors for "
            f"{len(active.vectors) + 1}: it was made for another backbone"
        )
    prompt = active.vectors[index - 1].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
    hidden = torch.cat([prompt, hidden[:, active.n :]], dim=1)
    if where == 0:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def layer_modules(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's layer modules (distinct, in order), or a DeepPromptError naming the fix."""
    try:
        layers = list(get_layers(backbone))
    except UnsupportedArchitectureError as err:
        raise DeepPromptError(
            f"prompt.deep=true puts vectors at every layer's input, but the layers of this backbone are "
            f"unknown ({err}); use prompt.deep=false (an input-only prompt), or name an adapter"
        ) from None
    return list({id(m): m for m in layers}.values())


def install(backbone: nn.Module) -> None:
    """Put the (idle) layer hook on every layer module of ``backbone`` that lacks it."""
    with _INSTALL:
        for module in layer_modules(backbone):
            if not any(h is _layer_hook for h in module._forward_pre_hooks.values()):
                module.register_forward_pre_hook(_layer_hook, with_kwargs=True)


def layer_inputs(backbone: nn.Module, prompt: torch.Tensor) -> list[torch.Tensor]:
    """Every layer call's input at the prompt positions, for the prompt (n, d) alone: one (n, d) each."""
    install(backbone)
    flags = {m: m.training for m in backbone.modules()}
    active = _Pass(None, prompt.shape[0])
    token = _ACTIVE.set(active)
    try:
        backbone.eval()
        with torch.no_grad():
            embeds = prompt.detach().to(next(backbone.parameters()).dtype)[None]
            backbone(inputs_embeds=embeds, attention_mask=torch.ones(1, prompt.shape[0], dtype=torch.long))
    finally:
        _ACTIVE.reset(token)
        for m, t in flags.items():
            m.training = t
    return active.recorded


class DeepPrompt(nn.Module):
    """Vectors ``(L-1, n, d)`` for the inputs of layers 1..L-1 (layer 0 reads the input prompt)."""

    def __init__(self, start: torch.Tensor, reparam: int = 0, source: torch.Tensor | None = None):
        super().__init__()
        self.reparam = int(reparam)
        if not self.reparam:
            self.vectors = nn.Parameter(start.detach().clone())
            return
        layers, n, d = start.shape
        self.register_buffer("start", start.detach().clone(), persistent=False)
        table = source if source is not None else torch.zeros(n, d)
        self.table = nn.Parameter(table.detach().clone())  # the MLP's own prompt embeddings
        self.up = nn.Parameter(torch.randn(d, self.reparam) / d**0.5)
        self.up_bias = nn.Parameter(torch.zeros(self.reparam))
        self.down = nn.Parameter(torch.zeros(self.reparam, layers * d))  # starts at `start` exactly
        self.down_bias = nn.Parameter(torch.zeros(layers * d))

    @classmethod
    def initialise(cls, backbone: nn.Module, prompt: torch.Tensor, reparam: int = 0) -> DeepPrompt:
        """Vectors starting at the backbone's own layer inputs for the input prompt ``prompt`` (n, d)."""
        inputs = layer_inputs(backbone, prompt)
        if len(inputs) < 2:
            raise DeepPromptError(
                f"prompt.deep=true needs a backbone of at least 2 layers (this one runs {len(inputs)}): "
                "use prompt.deep=false"
            )
        return cls(torch.stack(inputs[1:]), reparam, source=prompt)

    @property
    def num_layers(self) -> int:
        """Layer calls the vectors are for, the first (input prompt) included."""
        return 1 + (self.vectors.shape[0] if not self.reparam else self.start.shape[0])

    def reparam_parameters(self) -> list[nn.Parameter]:
        """The MLP's parameters (trained at ``prompt.reparam_lr``); empty once folded."""
        return [self.table, self.up, self.up_bias, self.down, self.down_bias] if self.reparam else []

    def current(self) -> torch.Tensor:
        """The vectors this forward uses: the parameter, or ``start + MLP(table)`` before folding."""
        if not self.reparam:
            return self.vectors
        hidden = torch.tanh(self.table @ self.up + self.up_bias)
        out = hidden @ self.down + self.down_bias  # (n, layers * d)
        n, (layers, _, d) = self.table.shape[0], self.start.shape
        return self.start + out.view(n, layers, d).transpose(0, 1)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by the vectors it gives now; a no-op once folded (or without reparam)."""
        if not self.reparam:
            return
        vectors = self.current().detach().clone()
        for name in ("table", "up", "up_bias", "down", "down_bias"):
            delattr(self, name)
        del self._buffers["start"]
        self.reparam = 0
        self.vectors = nn.Parameter(vectors)

    @contextlib.contextmanager
    def applied(self, backbone: nn.Module, num_tokens: int):
        """Inside, every forward of ``backbone`` (this thread) puts these vectors at the prompt positions
        ``0..num_tokens-1`` of each layer's input after the first; leaving checks every layer got one."""
        install(backbone)
        active = _Pass(self.current(), num_tokens)
        token = _ACTIVE.set(active)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
        if active.calls not in (0, self.num_layers):
            raise RuntimeError(
                f"the backbone ran {active.calls} layer calls but the deep prompt is for {self.num_layers}: "
                "it was made for another backbone"
            )

    # ---- the state dict holds the final vectors only (folded), whatever the training form ----
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.reparam:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        with torch.no_grad():
            destination[prefix + "vectors"] = self.current().detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.reparam and prefix + "vectors" in state_dict:
            self.fold()  # final vectors replace the MLP that would have made them
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def optimizer_groups(prompt: nn.Module, lr: float, reparam_lr: float) -> list[dict]:
    """The prompt's parameter groups: vectors at ``lr``, a reparameterising MLP at ``reparam_lr``."""
    deep = getattr(prompt, "deep", None)
    mlp = deep.reparam_parameters() if deep is not None else []
    ids = {id(p) for p in mlp}
    groups = [{"params": [p for p in prompt.parameters() if id(p) not in ids], "lr": lr, "weight_decay": 0.0}]
    if mlp:
        groups.append({"params": mlp, "lr": reparam_lr, "weight_decay": 0.0})
    return groups
