"""Sparse-sharing strategies: each task updates only the trunk entries its mask holds."""
