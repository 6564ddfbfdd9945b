"""fusioner: open-vocabulary semantic segmentation from frozen vision and language models."""

__version__ = "0.1.0"

from fusioner.model import FusionerModel  # noqa: E402

__all__ = ["FusionerModel", "__version__"]
