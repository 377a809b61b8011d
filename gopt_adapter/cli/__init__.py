"""The ``gopt`` command line (``gopt demo / train / eval / predict / inspect / export``) and what
its commands are made of: the demo, prediction files, panels and the evaluation gallery.

The top layer: it may import every other part of the package, and nothing imports it.
"""

from .commands import main

__all__ = ["main"]
