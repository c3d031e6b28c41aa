"""Find a task's neurons in a frozen transformer and prune the rest (no Lightning inside: usable anywhere).

score_neurons (or score_iteratively) -> Scores -> select_neurons(rate) -> masked(...) for the rate search -> prune_ffn in place.
check_adapter(backbone) first: it resolves the adapter (registered, named, or inferred) and proves it in seconds.
"""

from .arch import (
    Adapter,
    AttentionParts,
    LayerParts,
    UnsupportedArchitectureError,
    adapter_name,
    adopt_adapter,
    count_parameters,
    ffn_widths,
    get_adapter,
    get_layers,
    heads_per_layer,
    layer_parts,
    register_adapter,
    resolve_adapter,
    supported_model_types,
)
from .attribution import (
    CRITERIA,
    MAGNITUDES,
    TARGETS,
    TOKEN_AGGS,
    ScoreAccumulator,
    Scores,
    magnitude_scores,
    random_scores,
    score_neurons,
    task_target,
)
from .infer import AdapterCheckError, check_adapter, infer_adapter
from .iterative import rounds_of, score_iteratively
from .masks import NeuronMask, as_keep_mask, masked
from .prune import (
    backbone_flops,
    prune_ffn,
    prune_heads,
    prune_units,
    resize_to_widths,
    select_heads,
    select_neurons,
)
from .search import SearchResult, masked_evaluator, search_pruning_rate

__all__ = [
    "CRITERIA",
    "MAGNITUDES",
    "TARGETS",
    "TOKEN_AGGS",
    "Adapter",
    "AdapterCheckError",
    "AttentionParts",
    "LayerParts",
    "NeuronMask",
    "ScoreAccumulator",
    "Scores",
    "SearchResult",
    "UnsupportedArchitectureError",
    "adapter_name",
    "adopt_adapter",
    "as_keep_mask",
    "backbone_flops",
    "check_adapter",
    "count_parameters",
    "ffn_widths",
    "get_adapter",
    "get_layers",
    "heads_per_layer",
    "infer_adapter",
    "layer_parts",
    "magnitude_scores",
    "masked",
    "masked_evaluator",
    "prune_ffn",
    "prune_heads",
    "prune_units",
    "random_scores",
    "register_adapter",
    "resize_to_widths",
    "resolve_adapter",
    "rounds_of",
    "score_iteratively",
    "score_neurons",
    "search_pruning_rate",
    "select_heads",
    "select_neurons",
    "supported_model_types",
    "task_target",
]
