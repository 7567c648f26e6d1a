"""SkipPipe: pipeline-parallel LM training that skips and reorders stages (arXiv 2502.19913)."""

__version__ = "0.1.0"
