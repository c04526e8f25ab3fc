"""Quantization grids: how real values map to integer codes and back."""
from .affine import AffineGrid, QuantizedWeight

__all__ = ["AffineGrid", "QuantizedWeight"]
