"""qovaryx_model: an HF-compatible compact decoder (GQA, MTP, pluggable FFN backends, task heads).

Importing the package registers the config and models with the transformers Auto classes.
"""
from .config import PRESETS, QovaryxConfig
from .model import FinanceDecoder, QovaryxForCausalLM, QovaryxModel, parameter_counts
from .hf import export_pretrained, register

__version__ = "0.1.0"

register()

__all__ = ["QovaryxConfig", "QovaryxForCausalLM", "QovaryxModel", "FinanceDecoder", "PRESETS",
           "parameter_counts", "export_pretrained", "register"]
