"""The application: the ``fsmtl`` command (``run``, ``study``, ``benchmarks``, ``info``), its
pre-flight checks, presets, resumable runs, the multi-process launcher, the evaluation protocol
shared by ``fsmtl run`` and ``fsmtl study``, reports, statistics and progress."""
