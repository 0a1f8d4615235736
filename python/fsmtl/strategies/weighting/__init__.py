"""Weightings: how the T task gradients of the densely shared parameters combine into one update,
the other axis of the composed methods: equal weights (MTL), GradNorm, MGDA-UB, RLW, and torchjd's
aggregators (MGDA, PCGrad, CAGrad, Nash-MTL, RGW, UPGrad, ...)."""
