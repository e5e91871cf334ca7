"""Compiled kernels.  Private: import them through :mod:`pymig.core` and friends."""
