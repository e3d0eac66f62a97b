"""Data: from image folders to the batches the engine and the evaluations read.

Which file holds what:

- ``folder``: image folders (labeled or not), robust image loading, the dataset of samples;
  ``boxes``: object boxes files; ``fashion_mnist`` and ``scenes``: the demo's and the scene
  benchmark's folders (not imported here, so that ``python -m`` runs them cleanly).
- ``rng``: counter-based randomness and the one table of random streams (``rng.Stream``);
  ``sampler``: the epoch sampler (order per epoch, a seed per sample).
- ``views``: DINO's multi-crop views (crop geometry per sample, and Gram anchoring's teacher crops);
  ``photometric``: their batched color jitter, grayscale, blur and solarize (and the Gram crops');
  ``collate``: the pretraining batch.
- ``masking``: iBOT's patch masks; ``attmask``: AttMask's attention-guided masks;
  ``object_crops``: ODIS's object-aware views.
- ``eval_transform``: the evaluation view and its batches; ``tensors``: image and batch tensor
  helpers both sides share; ``loader``: the DataLoaders.
"""
from ssl_distill.data.collate import MultiCropCollate
from ssl_distill.data.eval_transform import EvalTransform, collate_eval
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
from ssl_distill.data.photometric import PhotometricAugment
from ssl_distill.data.sampler import EpochSampler
from ssl_distill.data.views import MultiCropTransform

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
