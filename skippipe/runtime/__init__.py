"""Distributed runtime: coordinator, workers, transport, control channel and launchers."""
