"""medssl: benchmark self-supervised pretraining of 3D Swin encoders for CT and MRI segmentation."""

from medssl.version import __version__

__all__ = ["__version__"]
