"""Tiny random Hugging Face backbones (hidden 32, 2 layers, 4 heads, FFN 64) and a stand-in localizable
model for the skeleton.localize tests. No download: every model is built from a config.

initializer_range is raised to 0.3 (and biases randomised) so that FFN neurons and heads move the output by O(1): with the usual
0.02 the pruned/masked differences would be so small that an equality test at atol 1e-5 could not fail.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModel

from skeleton.backbones import tiny_config as backbone_tiny_config

HIDDEN, LAYERS, HEADS, FFN, VOCAB, MAXPOS = 32, 2, 4, 64, 100, 64
STD = 0.3
FAMILIES = [
    "bert",
    "roberta",
    "xlm-roberta",
    "electra",
    "deberta-v2",
    "distilbert",
    "gpt2",
    "llama",
    "qwen2",
    "mistral",
]
GATED = {"llama", "qwen2", "mistral"}
GQA = {"qwen2", "mistral"}  # built with 2 key/value heads for 4 query heads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it on one intra-op thread: on a shared 2-core box, OpenMP threads
    of tiny matmuls contend with other processes and a 2 ms forward takes 200 ms."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


BERT_LIKE = {"bert", "roberta", "xlm-roberta", "electra", "deberta-v2"}


def test_overrides(family: str) -> dict:
    """What the unit tests change in the package's tiny configs: a small vocabulary and position table,
    large weights (see the module docstring), dropout on so that eval mode is checked, and for LLaMA one
    key/value head per query head (Qwen2 and Mistral keep their groups)."""
    positions = "n_positions" if family == "gpt2" else "max_position_embeddings"
    extra: dict = {positions: MAXPOS, "initializer_range": STD}
    if family in BERT_LIKE:
        extra.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, type_vocab_size=2)
    if family == "roberta" or family == "xlm-roberta":
        extra["pad_token_id"] = 1
    if family == "electra":
        extra["embedding_size"] = HIDDEN
    if family == "deberta-v2":
        extra.update(
            relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16, type_vocab_size=0
        )
    if family == "gpt2":
        extra.update(bos_token_id=0, eos_token_id=0)
    if family == "llama":
        extra["num_key_value_heads"] = HEADS
    return extra


def tiny_config(family: str):
    return backbone_tiny_config(family, VOCAB, **test_overrides(family))


def tiny_backbone(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(family)).eval()
    with torch.no_grad():  # HF zero-inits biases: random ones make a mis-sliced bias visible
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def make_batch(
    rows: int = 4, length: int = 8, lengths: list[int] | None = None, seed: int = 0, num_labels: int = 3
) -> dict:
    """Right-padded batch; `lengths` = real tokens per row (default: decreasing, at least 2)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [max(2, length - i) for i in range(rows)]
    ids = torch.randint(5, VOCAB, (rows, length), generator=g)
    am = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(am == 0, 0)
    labels = torch.randint(0, num_labels, (rows,), generator=g)
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def repad(batch: dict, length: int) -> dict:
    """The same rows right-padded to another length."""
    r, cur = batch["input_ids"].shape
    out = dict(batch)
    for k in ("input_ids", "attention_mask"):
        t = batch[k][:, : min(cur, length)]
        if length > cur:
            t = torch.cat([t, torch.zeros(r, length - cur, dtype=t.dtype)], 1)
        out[k] = t
    return out


class StandIn(nn.Module):
    """Minimal localizable model: backbone + masked mean pooling + linear head, optional soft prompt of
    `n_prompt` learned vectors prepended to the input embeddings (excluded by content_mask)."""

    def __init__(
        self, backbone: nn.Module, formulation: str = "classification", num_labels: int = 3, n_prompt=0
    ):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.task_formulation = formulation
        self.n_prompt = n_prompt
        self.prompt = nn.Parameter(torch.randn(n_prompt, hidden)) if n_prompt else None
        out = 1 if formulation in ("regression", "multiple_choice") else num_labels
        torch.manual_seed(1234)
        self.head = nn.Linear(hidden, out)

    def content_mask(self, batch: dict, include_prompt: bool = False) -> torch.Tensor:
        am = batch["attention_mask"].bool()
        prompt = torch.full((am.shape[0], self.n_prompt), include_prompt, dtype=torch.bool, device=am.device)
        return torch.cat([prompt, am], 1)

    def forward(self, batch: dict) -> torch.Tensor:
        ids, am = batch["input_ids"], batch["attention_mask"]
        if self.n_prompt:
            emb = self.backbone.get_input_embeddings()(ids)
            prompt = self.prompt.to(emb.dtype).expand(ids.shape[0], -1, -1)
            ones = torch.ones(ids.shape[0], self.n_prompt, dtype=am.dtype, device=am.device)
            h = self.backbone(
                inputs_embeds=torch.cat([prompt, emb], 1), attention_mask=torch.cat([ones, am], 1)
            )
        else:
            h = self.backbone(input_ids=ids, attention_mask=am)
        h = h.last_hidden_state
        cm = self.content_mask(batch).unsqueeze(-1).to(h.dtype)
        logits = self.head((h * cm).sum(1) / cm.sum(1).clamp_min(1))
        if self.task_formulation == "regression":
            return logits[:, 0]
        if self.task_formulation == "multiple_choice":
            return logits.view(-1, batch["num_choices"])
        return logits
