"""Loss- and gradient-balancing peers written here (torchjd has no GradNorm or MGDA-UB)."""
