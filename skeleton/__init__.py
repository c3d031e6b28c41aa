"""Skeleton: task-neuron localized prompt tuning (arXiv 2404.11916)."""

import os
import warnings

__version__ = "0.1.0"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
# Expected here, so only noise: the frozen backbone stays in eval mode on purpose, and
# Lightning / W&B deprecation notices that users cannot act on.
for _message in (r".*module\(s\) in eval mode.*", ".*LeafSpec.*"):
    warnings.filterwarnings("ignore", message=_message)
