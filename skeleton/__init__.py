"""Skeleton: task-neuron localized prompt tuning (arXiv 2404.11916)."""

__version__ = "0.1.0"
