"""The package version (one place; ``fss.__version__`` re-exports it)."""

__version__ = "0.1.0"
