"""Conversion workflow: teacher adapters, layer selection, mixer initialization, streaming checkpoint IO."""

from .checkpoint_io import CheckpointError, OutputExistsError
from .pipeline import ConversionResult, convert
from .selection import LayerSelectionError, select_attention_layers

__all__ = [
    "CheckpointError",
    "ConversionResult",
    "LayerSelectionError",
    "OutputExistsError",
    "convert",
    "select_attention_layers",
]
