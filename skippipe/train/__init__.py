"""Training: shared per-node compute, optimizer, the in-process reference executor and loop."""
