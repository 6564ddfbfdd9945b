"""The names in an export folder and the manifest's mark (written by writer.py, read by runtime.py)."""

from fusioner.model.files import CONFIG_NAME

MANIFEST = "export.json"
WRITER = "fusioner export"  # the manifest's mark: a folder without it is not this command's
PREDICTOR, TEXT, TOKENIZER = "predictor.onnx", "text.onnx", "tokenizer"
NAMES, EMBEDDINGS = "names.json", "embeddings.npy"
# Every name an export may write (ONNX keeps weights over 2 GB in a ``.data`` file beside the graph):
# an existing --out holding anything else is someone else's folder.
OWN_FILES = frozenset(
    {
        PREDICTOR,
        f"{PREDICTOR}.data",
        TEXT,
        f"{TEXT}.data",
        TOKENIZER,
        NAMES,
        EMBEDDINGS,
        CONFIG_NAME,
        MANIFEST,
    }
)
