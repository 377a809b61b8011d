"""The library version: a leaf module, read by the adapter files and by pyproject.toml."""

__version__ = "0.1.0"
