"""`fusioner demo`: a Gradio app over a trained model (``build_app``) and its Hugging Face Space."""

from fusioner.demo.app import build_app, launch
from fusioner.demo.space import export_space

__all__ = ["build_app", "export_space", "launch"]
