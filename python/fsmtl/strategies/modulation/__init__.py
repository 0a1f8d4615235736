"""Per-task modulation of the shared trunk's activations: squeeze-and-excitation (SE), task
routing (TR) and maximum roaming (MR). Shared weights stay dense; each task sees its own
channel gates or unit masks."""
