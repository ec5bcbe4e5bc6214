"""datamatters: which training data matters, and how training gets there."""
__version__ = "0.1.0"
