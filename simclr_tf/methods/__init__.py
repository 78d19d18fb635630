"""Semi-supervised train modes: one module per method (loss, batches, extra state)."""
