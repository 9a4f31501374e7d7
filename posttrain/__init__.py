"""posttrain: shared plumbing for the post-training pipeline (config, artifacts, models, formatting, tracking)."""

__version__ = "0.1.0"
