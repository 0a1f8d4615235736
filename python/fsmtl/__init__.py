"""FSMTL method library."""
