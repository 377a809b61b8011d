"""gopt-adapter: GoPT grouping prompters for frozen timm Vision Transformers."""

__version__ = "0.1.0"
