"""medssl: benchmark self-supervised pretraining of 3D Swin encoders for CT and MRI segmentation."""

__version__ = "0.1.0"
