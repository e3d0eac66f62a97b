"""Data: image folders, robust loading, DINO multi-crop views, iBOT masks, the epoch sampler.

Fashion-MNIST helpers live in :mod:`ssl_distill.data.fashion_mnist` (not imported here so that
``python -m ssl_distill.data.fashion_mnist`` runs cleanly).
"""
from ssl_distill.data.folder import (
    IMAGE_EXTENSIONS,
    BadImageCounter,
    BadImageWarning,
    DataError,
    FileList,
    ImageFolderDataset,
    load_rgb,
    scan_image_folder,
)
from ssl_distill.data.masking import BatchMasking, MaskingGenerator, build_masking
from ssl_distill.data.eval_transform import EvalTransform, collate_eval
from ssl_distill.data.multicrop import MultiCropCollate, MultiCropTransform, PhotometricAugment
from ssl_distill.data.sampler import EpochSampler

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageCounter",
    "BadImageWarning",
    "BatchMasking",
    "DataError",
    "EpochSampler",
    "EvalTransform",
    "FileList",
    "ImageFolderDataset",
    "MaskingGenerator",
    "MultiCropCollate",
    "MultiCropTransform",
    "PhotometricAugment",
    "build_masking",
    "collate_eval",
    "load_rgb",
    "scan_image_folder",
]
