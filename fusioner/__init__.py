"""fusioner: open-vocabulary semantic segmentation from frozen vision and language models."""

__version__ = "0.1.0"
