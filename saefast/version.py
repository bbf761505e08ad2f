"""The version of saefast."""

__version__ = "0.1.0"
