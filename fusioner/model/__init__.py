from fusioner.model.fusioner import FusionerModel, FusionHead, HeadConfig, labels_from_logits

__all__ = ["FusionHead", "FusionerModel", "HeadConfig", "labels_from_logits"]
