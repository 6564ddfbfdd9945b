"""The library's version, in a module of its own: code that records it (a saved model's config.json,
an export manifest, a dataset card) reads it here instead of importing the whole package."""

__version__ = "0.1.0"
