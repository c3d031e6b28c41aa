"""Inference paths: one way of running a model fast, applied alike to the dense and the pruned model, so
that a speedup always compares like with like (pruned int8 against dense int8, never against dense eager).

    eager    the family's plain PyTorch attention (softmax(QK^T) V written out)
    sdpa     torch.nn.functional.scaled_dot_product_attention, through transformers' attention interface
    compile  sdpa (eager where the family has no sdpa) under torch.compile
    int8     sdpa (or eager) with every nn.Linear dynamically quantized to int8 (CPU only)

`prepare(model, path, device=..., dtype=...)` returns a prepared copy; the model passed in is never changed.
`check_path` raises `PathUnsupportedError`, naming the path and the reason, before anything is timed.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import warnings

import torch
import transformers
from torch import nn

from skeleton.localize import layer_parts

PATHS = ("eager", "sdpa", "compile", "int8")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class PathUnsupportedError(ValueError):
    """A path this model, device, dtype or torch build cannot run."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"path {path!r}: {reason}")


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def _current_attention(backbone: nn.Module) -> str | None:
    config = getattr(backbone, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def _can_switch(backbone: nn.Module) -> bool:
    check = getattr(type(backbone), "_can_set_attn_implementation", None)
    return bool(check()) if check is not None and hasattr(backbone, "set_attn_implementation") else False


def has_sdpa(model: nn.Module) -> bool:
    """Whether the backbone's family routes attention through SDPA in this transformers (DeBERTa-v2 does not)."""
    backbone = _backbone(model)
    if _current_attention(backbone) == "sdpa":
        return True
    return bool(getattr(type(backbone), "_supports_sdpa", False)) and _can_switch(backbone)


def attention_for(model: nn.Module, path: str) -> str:
    """The attention implementation a path runs with: eager for `eager`, sdpa where the family has it."""
    if path == "eager":
        return "eager"
    return "sdpa" if has_sdpa(model) else "eager"


def default_path(model: nn.Module) -> str:
    """What transformers 5 picks by itself: sdpa where the family supports it, else eager."""
    return "sdpa" if has_sdpa(model) else "eager"


def _quantizable(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules int8 can take. Left out: zero-width linears (an emptied FFN: torch's
    quantized linear with no input features returns uninitialised memory instead of its bias) and linears
    without a weight of their own (a verbalizer's output layer tied to the input embeddings)."""
    return [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and m.weight is not None and m.in_features > 0 and m.out_features > 0
    ]


def _quantize_dynamic():
    """torch.ao.quantization.quantize_dynamic, or None where this torch no longer has it. torch 2.13 still
    ships it but warns that torch.ao.quantization is deprecated in favour of torchao."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic
    except ImportError:
        return None
    return quantize_dynamic


def _cxx_compiler() -> str | None:
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return name
    return None


def check_path(
    model: nn.Module,
    path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    compile_backend: str = "inductor",
) -> None:
    """Raise PathUnsupportedError if `model` cannot run `path` on `device` in `dtype`; cheap, times nothing."""
    device, dtype = torch.device(device), as_dtype(dtype)
    if path not in PATHS:
        raise PathUnsupportedError(path, f"unknown path; choose from {', '.join(PATHS)}")
    backbone = _backbone(model)
    family = type(backbone).__name__
    version = f"transformers {transformers.__version__}"
    if path == "sdpa" and not has_sdpa(model):
        raise PathUnsupportedError(
            path,
            f"{family} has no SDPA attention in {version}; time it with --paths eager (or compile, int8)",
        )
    if path == "eager" and _current_attention(backbone) not in (None, "eager") and not _can_switch(backbone):
        raise PathUnsupportedError(
            path, f"{family} cannot switch its attention implementation to eager in {version}"
        )
    if path == "compile":
        if not hasattr(torch, "compile"):
            raise PathUnsupportedError(path, f"torch {torch.__version__} has no torch.compile")
        if compile_backend == "inductor" and device.type == "cpu" and _cxx_compiler() is None:
            raise PathUnsupportedError(
                path,
                "torch.compile's inductor backend needs a C++ compiler on CPU and none of c++, g++, clang++ "
                "is on PATH; install one or pass --compile-backend aot_eager",
            )
        if compile_backend == "inductor" and device.type == "cuda" and not importlib.util.find_spec("triton"):
            raise PathUnsupportedError(path, "torch.compile's inductor backend needs triton on CUDA")
    if path == "int8":
        if device.type != "cpu":
            raise PathUnsupportedError(
                path,
                f"dynamic int8 quantization runs on CPU only (torch's quantized linear), not {device}; "
                "time it with --device cpu",
            )
        if dtype != torch.float32:
            raise PathUnsupportedError(
                path, f"dynamic int8 quantizes float32 models, not {dtype_name(dtype)}"
            )
        if _quantize_dynamic() is None:
            raise PathUnsupportedError(
                path,
                f"torch {torch.__version__} no longer has torch.ao.quantization.quantize_dynamic "
                "(its successor is torchao's quantize_)",
            )
        if torch.backends.quantized.engine == "none":
            raise PathUnsupportedError(
                path, "this torch build has no quantized engine (fbgemm, onednn, qnnpack)"
            )
        if not _layers_have_linears(backbone):
            raise PathUnsupportedError(
                path,
                f"{family}'s transformer layers hold no nn.Linear to quantize (GPT-2 keeps them in Conv1D)",
            )


def _layers_have_linears(backbone: nn.Module) -> bool:
    """Whether the layers' projections (where the FLOPs are) include an nn.Linear for int8 to take."""
    try:
        parts = layer_parts(backbone)
    except Exception:  # no adapter for this family: any linear counts
        return bool(_quantizable(backbone))
    projections = [m for p in parts for m in (p.up, p.gate, p.down, p.attn.q, p.attn.k, p.attn.v, p.attn.out)]
    return any(type(m) is nn.Linear for m in projections)


def prepare(
    model: nn.Module,
    path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    compile_backend: str = "inductor",
    compile_mode: str | None = None,
) -> nn.Module:
    """A copy of `model` in eval mode on `device` / `dtype`, set up to run `path`; `model` is untouched.

    compile: the whole model (prompt, backbone, head) is compiled lazily, so the first call per input shape
    compiles: time it only after a warm call (`bench.benchmark` does)."""
    check_path(model, path, device=device, dtype=dtype, compile_backend=compile_backend)
    dtype = as_dtype(dtype)
    out = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    backbone = _backbone(out)
    attention = attention_for(out, path)
    if _current_attention(backbone) not in (None, attention):  # None: not a transformers model, runs as is
        backbone.set_attn_implementation(attention)
    if path == "int8":
        quantize = _quantize_dynamic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
            quantize(out, set(_quantizable(out)), dtype=torch.qint8, inplace=True)
    if path == "compile":
        out.compile(backend=compile_backend, mode=compile_mode, dynamic=False)
    return out
