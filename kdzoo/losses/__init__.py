"""Losses: pure functions in :mod:`kdzoo.losses.functional`, stateful wrappers here."""

from kdzoo.losses import functional

__all__ = ["functional"]
