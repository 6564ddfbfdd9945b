"""The two files of a saved model folder (``FusionerModel.save_pretrained``: a Hub repo, a run's
``model/``), named apart from the model so that a run directory (fusioner/run.py) can check for
them without importing it."""

CONFIG_NAME = "config.json"  # the head's hyper-parameters and the adapters' names, weights, templates
WEIGHTS_NAME = "model.safetensors"  # the head's weights alone
