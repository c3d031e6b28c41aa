"""Serving: one dense backbone in memory answers every registered task on its own skeleton."""

from skeleton.serve.multitask import InputError, MultiTaskModel, UnknownTaskError, share_modules

__all__ = ["InputError", "MultiTaskModel", "UnknownTaskError", "share_modules"]
