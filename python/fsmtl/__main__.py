"""``python -m fsmtl``: the ``fsmtl`` command; ``torchrun --nproc_per_node=N -m fsmtl run ...`` runs it on N ranks."""

import sys

from .run.cli import main

sys.exit(main())
