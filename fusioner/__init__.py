"""fusioner: open-vocabulary semantic segmentation from frozen vision and language models."""

from fusioner.model import FusionerModel
from fusioner.version import __version__

__all__ = ["FusionerModel", "__version__"]
