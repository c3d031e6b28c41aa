"""Verbalizer head: class scores are the frozen language model's own log-probabilities of label words.

A linear head on a decoder throws away what its language-model head knows; a verbalizer keeps it. The
input is followed by a short template whose ``{mask}`` marks where the label word goes ("It was
{mask}." for SST-2); the language model predicts a word there, and class c scores
``log P(word_c)`` from the LM's own output layer, plus one trained offset per class (label words differ
in prior frequency; multiple choice has none). Masked LMs (BERT, RoBERTa, ...) read the ``[MASK]`` token of the template;
causal LMs (GPT-2, LLaMA, ...) read the next-token prediction at the template's last token (text after
``{mask}`` is dropped for them).

- The template is inserted after each row's last real token (before a trailing ``[SEP]``/EOS the
  tokenizer adds) inside the model, in token space: the data pipeline, its caches and every reader of
  a batch stay as they are, and the template can never be truncated away by ``data.max_length``.
- Label words of several tokens score the mean (``multi_token=mean``, default), the sum or the first
  of their tokens' log-probabilities at the one prediction position.
- The LM's output layer is the frozen one it was trained with, weights tied to the input embeddings
  where the family ties them: it is never pruned (only FFN neurons and heads are), never copied and
  never saved in an artifact (artifacts rebuild it from the backbone; only the offsets are trained).
- Regression (STS-B) is refused: a label word has no value. Multiple choice (COPA, ReCoRD) scores each
  choice row by the log-probability of one word (default "Yes") after its template, and the choices
  compete through the usual softmax over rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

HEADS = ("linear", "verbalizer")
MULTI_TOKEN = ("mean", "sum", "first")
MASK = "{mask}"
VERBALIZER_KEYS = ("words", "template", "multi_token")

YES_NO = ("Yes", "No")
NO_YES = ("No", "Yes")
NLI2 = ("Does the first text imply the second? {mask}.", YES_NO)  # entailment, not_entailment
# Default (template, label words in the task's label order) for every task in the registry.
DEFAULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cola": ("Is this sentence grammatical? {mask}.", NO_YES),  # unacceptable, acceptable
    "sst2": ("It was {mask}.", ("terrible", "great")),  # negative, positive
    "mrpc": ("Do the two sentences mean the same? {mask}.", NO_YES),  # not_equivalent, equivalent
    "qqp": ("Do the two questions ask the same? {mask}.", NO_YES),  # not_duplicate, duplicate
    "mnli": ("Does the first text imply the second? {mask}.", ("Yes", "Maybe", "No")),
    "mnli-mm": ("Does the first text imply the second? {mask}.", ("Yes", "Maybe", "No")),
    "qnli": ("Does the sentence answer the question? {mask}.", YES_NO),  # entailment, not_entailment
    "rte": NLI2,
    "wnli": ("Does the first text imply the second? {mask}.", NO_YES),  # not_entailment, entailment
    "boolq": ("Is the answer to the question yes? {mask}.", NO_YES),  # False, True
    "cb": ("Does the first text imply the second? {mask}.", ("Yes", "No", "Maybe")),
    "copa": ("Is this right? {mask}.", ("Yes",)),  # multiple choice: one word scores each choice
    "multirc": ("Is this answer correct? {mask}.", NO_YES),
    "record": ("Is this right? {mask}.", ("Yes",)),
    "superglue-rte": NLI2,
    "wic": ("Is the marked word used in the same sense in both? {mask}.", NO_YES),
    "wsc": ("Does the bracketed pronoun refer to the starred noun? {mask}.", NO_YES),
    "axb": NLI2,
    "axg": NLI2,
}


class VerbalizerError(ValueError):
    """A verbalizer setting that cannot work for this task or tokenizer: named, with the fix."""


@dataclass
class VerbalizerConfig:
    """``module.verbalizer``: label words (one per class, in the task's label order, or a mapping from
    label name to word; None = the task's default), the template (None = the task's default) and how
    a label word of several tokens is scored."""

    words: list[str] | dict[str, str] | None = None
    template: str | None = None
    multi_token: str = "mean"
    resolved: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, value, task) -> VerbalizerConfig:
        """Validated settings for ``task`` (a TaskSpec) from a dict, a config or None."""
        if isinstance(value, VerbalizerConfig):
            value = {k: getattr(value, k) for k in VERBALIZER_KEYS}
        if isinstance(value, DictConfig):  # as Hydra's instantiate passes it
            value = OmegaConf.to_container(value, resolve=True)
        value = dict(value or {})
        unknown = sorted(set(value) - set(VERBALIZER_KEYS))
        if unknown:
            raise VerbalizerError(
                f"module.verbalizer has unknown key(s) {unknown}; allowed: {', '.join(VERBALIZER_KEYS)}"
            )
        cfg = cls(**value)
        cfg.resolve(task)
        return cfg

    def resolve(self, task) -> None:
        if self.multi_token not in MULTI_TOKEN:
            raise VerbalizerError(
                f"module.verbalizer.multi_token={self.multi_token!r} is unknown; allowed: {', '.join(MULTI_TOKEN)}"
            )
        if task.formulation == "regression":
            raise VerbalizerError(
                f"module.head=verbalizer cannot score the regression task {task.name!r} (a label word has "
                "no value); use module.head=linear"
            )
        template, words = DEFAULTS.get(task.name, ("{mask}", None))
        template = self.template if self.template is not None else template
        if not isinstance(template, str) or template.count(MASK) != 1:
            raise VerbalizerError(
                f"module.verbalizer.template={template!r} must contain {MASK} exactly once (where the label "
                "word goes), e.g. 'It was {mask}.'"
            )
        words = self._words(task, words)
        self.resolved = {"template": template, "words": list(words)}

    def _words(self, task, default) -> tuple[str, ...]:
        need = 1 if task.formulation == "multiple_choice" else len(task.labels)
        what = (
            "1 word (it scores each choice)" if need == 1 else f"{need} words, for {', '.join(task.labels)}"
        )
        words = self.words
        if words is None:
            if default is None:
                raise VerbalizerError(
                    f"task {task.name!r} has no default label words: set module.verbalizer.words=[...] ({what})"
                )
            return tuple(default)
        if isinstance(words, (DictConfig, ListConfig)):
            words = OmegaConf.to_container(words, resolve=True)
        if isinstance(words, Mapping):
            missing = [label for label in task.labels or () if label not in words]
            extra = [k for k in words if k not in (task.labels or ())]
            if missing or extra or need == 1:
                raise VerbalizerError(
                    f"module.verbalizer.words={dict(words)} must map each label of {task.name} "
                    f"({', '.join(task.labels or ())}) to a word; missing {missing}, unknown {extra}"
                )
            words = [words[label] for label in task.labels]
        words = tuple(words) if isinstance(words, (list, tuple)) else (words,)
        if len(words) != need or not all(isinstance(w, str) and w.strip() for w in words):
            raise VerbalizerError(f"module.verbalizer.words={list(words)} must be {what}, non-empty strings")
        if len(set(words)) != len(words):
            raise VerbalizerError(
                f"module.verbalizer.words={list(words)} repeats a word: classes must differ"
            )
        return words

    def to_dict(self) -> dict:
        """The settings as used (defaults filled in), so a reload never depends on today's defaults."""
        return {**self.resolved, "multi_token": self.multi_token}


def check_head(head: str, verbalizer, task, head_hidden: int = 0) -> VerbalizerConfig | None:
    """``module.head`` and ``module.verbalizer`` for ``task``, checked before any data or model is
    loaded; the verbalizer settings when the head is one."""
    if head not in HEADS:
        raise ValueError(f"module.head={head!r} is unknown; allowed: {', '.join(HEADS)}")
    if head == "verbalizer" and head_hidden:
        raise VerbalizerError(
            f"module.head_hidden={head_hidden} shapes the linear head only; module.head=verbalizer has no "
            "hidden layer (it reads the LM's own output layer): set module.head_hidden=0"
        )
    return VerbalizerConfig.of(verbalizer, task) if head == "verbalizer" else None


# ---- which language model ---------------------------------------------------------------------------
def lm_kind(model_type: str | None) -> str | None:
    """ "causal" for decoder-only families (GPT-2, LLaMA, Qwen2, Mistral, OPT, Phi, ...), "masked" for
    families with a masked-LM head (BERT, RoBERTa, DeBERTa, ...), None when transformers has neither.
    Families with both (BERT also has a causal LM head for decoding) are encoders: masked."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    return None


def is_causal(model_type: str | None) -> bool:
    """Decoder-only: each position sees only the ones before it."""
    return lm_kind(model_type) == "causal"


class _GivenHidden(nn.Module):
    """Stands in for the base model inside a ``*ForCausalLM`` / ``*ForMaskedLM``: it returns the hidden
    states handed to the LM as ``inputs_embeds``, so the LM's own forward applies just its head."""

    def forward(self, *args, inputs_embeds=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=inputs_embeds)


class LMOutput(nn.Module):
    """The part of a language model after its base model (BERT's MLM transform and decoder, GPT-2's
    tied ``lm_head``, LLaMA's ``lm_head``), frozen. Whatever the family computes there, its own forward
    computes: the base model inside it is replaced by `_GivenHidden`. A weight tied to the input
    embeddings is not held here but taken from the backbone at each call, so the head follows the
    backbone it is used with (a pruned copy, a re-created dense twin) and nothing is copied."""

    def __init__(self, lm: nn.Module, backbone: nn.Module):
        super().__init__()
        out = lm.get_output_embeddings()
        self.tied = out is not None and out.weight is backbone.get_input_embeddings().weight
        setattr(lm, lm.base_model_prefix, _GivenHidden())
        self.tied_name = None
        if self.tied:
            name = next(n for n, p in lm.named_parameters(remove_duplicate=False) if p is out.weight)
            out.register_parameter("weight", None)  # the backbone's embedding, passed in at each call
            self.tied_name = name
        self.lm = lm

    def forward(self, hidden: torch.Tensor, backbone: nn.Module) -> torch.Tensor:
        """(R, H) final hidden states -> (R, V) vocabulary logits."""
        if self.tied:
            weight = backbone.get_input_embeddings().weight
            params = {self.tied_name: weight}
            logits = torch.func.functional_call(
                self.lm, params, (), {"inputs_embeds": hidden[:, None]}
            ).logits
        else:
            logits = self.lm(inputs_embeds=hidden[:, None]).logits
        return logits[:, -1]


# ---- token-level pieces --------------------------------------------------------------------------
@dataclass
class Tokens:
    """What a template and its label words become for one tokenizer and LM kind."""

    suffix: list[int]  # template tokens inserted after the input
    predict_offset: int  # index in `suffix` of the position whose prediction is the label word
    words: list[list[int]]  # each label word's tokens
    before_last: bool  # the tokenizer ends every input with a special token: insert before it


def tokens_for(tokenizer, template: str, words: list[str], kind: str) -> Tokens:
    """Tokenize the template around ``{mask}`` and the label words as they read after its prefix. The
    template follows the input text, so it starts a new word (a byte-level BPE vocabulary, GPT-2's or
    Qwen2's, has "ĠIt", not "It", there)."""
    head, tail = template.split(MASK)

    def encode(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        while ids and not tokenizer.decode(ids[:1]).strip():  # a lone word-boundary token ("▁")
            ids = ids[1:]
        return ids

    head = " " + head.lstrip() if head.strip() else head
    prefix = encode(head.rstrip()) if head.strip() else []
    if kind == "masked":
        if tokenizer.mask_token_id is None:
            raise VerbalizerError(
                f"module.head=verbalizer on a masked LM needs a tokenizer with a mask token; "
                f"{tokenizer.name_or_path} has none"
            )
        suffix = prefix + [tokenizer.mask_token_id] + (encode(tail) if tail.strip() else [])
        offset = len(prefix)
    else:  # causal: the word is the next token after the template's text before {mask}
        suffix, offset = prefix, len(prefix) - 1
    spaced = head.endswith(" ") or not head
    word_ids = [_word_tokens(encode, head.rstrip(), w, spaced) for w in words]
    empty = [w for w, ids in zip(words, word_ids) if not ids]
    if empty:
        raise VerbalizerError(
            f"module.verbalizer.words: {empty} tokenize to nothing with {tokenizer.name_or_path}"
        )
    probe = tokenizer("a")["input_ids"]
    before_last = bool(probe) and probe[-1] in set(tokenizer.all_special_ids)
    return Tokens(suffix, offset, word_ids, before_last)


def _word_tokens(encode, prefix: str, word: str, spaced: bool) -> list[int]:
    """The word's tokens as they follow the template's prefix (a BPE vocabulary has " great", not
    "great", after a space): the tokens of prefix + word minus those of the prefix, when the prefix
    tokenizes the same inside; else the word alone with its leading space."""
    text = f" {word}" if spaced else word
    if prefix.strip():
        whole, alone = encode(prefix + text), encode(prefix)
        if whole[: len(alone)] == alone and len(whole) > len(alone):
            return whole[len(alone) :]
    return encode(text)


def insert_suffix(batch: dict, suffix: torch.Tensor, before_last: bool, predict_offset: int) -> dict:
    """A copy of ``batch`` with ``suffix`` inserted after each row's last real token (before it when
    ``before_last``), whatever the padding side, and ``predict_at``: the text position whose output
    predicts the label word. Token types of the inserted tokens are those of the token before them."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, length = ids.shape
    k = len(suffix)
    pos = torch.arange(length, device=ids.device)
    last = (mask.bool() * (pos + 1)).amax(1) - 1  # -1 for a row with no real token
    at = (last + (0 if before_last else 1)).clamp(min=0)  # (R,) where the suffix starts
    target = pos + k * (pos >= at[:, None])  # each old position's new place
    span = at[:, None] + torch.arange(k, device=ids.device)  # (R, k)
    out = dict(batch)
    new_ids = ids.new_zeros(rows, length + k).scatter(1, target, ids)
    out["input_ids"] = new_ids.scatter(1, span, suffix.to(ids)[None].expand(rows, k))
    new_mask = mask.new_zeros(rows, length + k).scatter(1, target, mask)
    out["attention_mask"] = new_mask.scatter(1, span, mask.new_ones(rows, k))
    if "token_type_ids" in batch:
        types = batch["token_type_ids"]
        new_types = types.new_zeros(rows, length + k).scatter(1, target, types)
        before = types.gather(1, (at - 1).clamp(min=0)[:, None]).expand(rows, k)
        out["token_type_ids"] = new_types.scatter(1, span, before)
    out["predict_at"] = at + predict_offset
    return out


class VerbalizerHead(nn.Module):
    """Vocabulary log-probabilities at the prediction position -> class scores (B, C), or one score
    per choice row (B, num_choices) for multiple choice. Trains one offset per class (classification)."""

    def __init__(self, formulation: str, word_tokens: list[list[int]], multi_token: str = "mean"):
        super().__init__()
        self.formulation, self.multi_token = formulation, multi_token
        width = max(len(t) for t in word_tokens)
        ids = torch.zeros(len(word_tokens), width, dtype=torch.long)
        valid = torch.zeros(len(word_tokens), width, dtype=torch.bool)
        for c, toks in enumerate(word_tokens):
            toks = toks[:1] if multi_token == "first" else toks
            ids[c, : len(toks)], valid[c, : len(toks)] = torch.tensor(toks), True
        self.register_buffer("token_ids", ids, persistent=False)  # rebuilt from the config, not saved
        self.register_buffer("token_valid", valid, persistent=False)
        # One offset per class against the words' unequal prior frequency; none for multiple choice,
        # where one word scores every choice and an offset would cancel in the softmax over choices.
        classes = len(word_tokens) if formulation == "classification" else 0
        self.bias = nn.Parameter(torch.zeros(classes)) if classes else None

    def forward(
        self, logprobs: torch.Tensor, num_choices: int = 1, choice_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        picked = logprobs[:, self.token_ids] * self.token_valid  # (R, C, width)
        scores = picked.sum(-1)
        if self.multi_token == "mean":
            scores = scores / self.token_valid.sum(-1)
        if self.formulation == "classification":
            return scores + self.bias
        scores = scores[:, 0].view(-1, num_choices)
        if choice_mask is not None:
            scores = scores.masked_fill(~choice_mask.bool(), float("-inf"))
        return scores


@dataclass
class Verbalizer:
    """The built pieces: the backbone (the LM's base model), its frozen output layer, the head and the
    template tokens (as a tensor, for `insert_suffix`)."""

    backbone: nn.Module
    output: LMOutput
    head: VerbalizerHead
    tokens: Tokens
    kind: str


def build(
    backbone_name: str, task, cfg: VerbalizerConfig, *, backbone: nn.Module | None = None, seed: int = 0
):
    """Load ``backbone_name`` with its LM head and build the verbalizer for ``task``. With a ready
    ``backbone`` (a serving view), only the LM head is taken from the loaded model and tied to it."""
    from skeleton.backbones import load_lm, load_tokenizer, model_type_of_name

    model_type = model_type_of_name(backbone_name) if backbone is None else backbone.config.model_type
    kind = lm_kind(model_type)
    if kind is None:
        raise VerbalizerError(
            f"module.head=verbalizer: transformers has no causal or masked LM head for model_type="
            f"{model_type!r} ({backbone_name}); use module.head=linear"
        )
    base, lm = load_lm(backbone_name, kind, seed=seed)
    base = backbone if backbone is not None else base
    output = LMOutput(lm, base).requires_grad_(False)
    tokens = tokens_for(load_tokenizer(backbone_name), cfg.resolved["template"], cfg.resolved["words"], kind)
    head = VerbalizerHead(task.formulation, tokens.words, cfg.multi_token)
    return Verbalizer(base, output, head, tokens, kind)
