"""Data layer: defensive decoding, data sets, multi-crop augmentation and the training loader.

Submodules are imported on use (``from excb.data.decode import decode_image``) so the embed service can
decode images without importing torchvision's transforms.
"""
