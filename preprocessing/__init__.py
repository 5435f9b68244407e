"""Whole-slide preprocessing: slide access, tissue segmentation, tiling, patch encoders, feature stores."""

__version__ = "0.1.0"
