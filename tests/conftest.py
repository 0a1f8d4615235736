"""Test set-up: Triton runs under its CPU interpreter where no GPU exists.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` decorator runs, so it is set here,
before the test modules import the package.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
