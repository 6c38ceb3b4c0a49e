"""Compatibility: the name lookup now lives in :mod:`gpunn.checks` with the other argument checks."""

from gpunn.checks import lookup, unknown_name_error

__all__ = ["lookup", "unknown_name_error"]
