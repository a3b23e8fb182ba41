"""qovaryx_model: an HF-compatible compact decoder (GQA, MTP, pluggable FFN backends, task heads)."""
__version__ = "0.1.0"
