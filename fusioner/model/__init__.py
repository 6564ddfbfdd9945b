from fusioner.model.head import FusionHead, HeadConfig
from fusioner.model.model import FusionerModel

__all__ = ["FusionHead", "FusionerModel", "HeadConfig"]
