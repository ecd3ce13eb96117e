"""saofu: an MLOps pipeline for small on-device vision models (the 福 recogniser by default)."""

__version__ = "0.1.0"
