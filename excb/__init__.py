"""ExCB: self-supervised pretraining with explicit cluster balancing (ECCV 2024), end to end."""

__version__ = "0.1.0"
