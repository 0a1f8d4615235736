"""Dense-sharing strategies: every task updates every shared parameter."""
