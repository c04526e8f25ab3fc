"""Quantization grids: how real values map to integer codes and back."""
from .affine import PER_CHANNEL, AffineGrid, QuantizedWeight

__all__ = ["PER_CHANNEL", "AffineGrid", "QuantizedWeight"]
