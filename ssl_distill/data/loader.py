"""The DataLoaders the engine and the evaluations use."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..errors import AnnotationError
from .boxes import read_boxes
from .collate import MultiCropCollate
from .eval_transform import EvalTransform, collate_eval
from .folder import ImageFolderDataset, scan_image_folder
from .masking import build_masking
from .object_crops import ObjectMultiCropTransform
from .sampler import EpochSampler
from .views import MultiCropTransform


def build_train_loader(
    cfg: Config, cache_file: Path | None, rank: int = 0, world_size: int = 1, gram_from_step: int | None = 0
) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    """Multi-crop pretraining loader over ``cfg.data.train_dir`` (unlabeled, any nesting).

    The sampler fixes the data order per (seed, epoch) and each sample's augmentation per
    (seed, epoch, index); the loader gets its own generator so that creating an iterator never
    consumes the global torch RNG (drop-path draws from it; resuming stays bit-identical).
    With ``cfg.masking.shape != "none"`` each batch also has iBOT's ``"masks"`` of the global views
    (:mod:`ssl_distill.data.masking`), keyed the same way; the sampler then passes the epoch along.
    With ``cfg.data.boxes`` the views are object-aware (:mod:`ssl_distill.data.object_crops`) and
    each batch has ``"obj_masks"`` and ``"obj_valid"``; ``loader.dataset.boxes.report`` counts the
    boxes file's images and its kept, clipped and dropped boxes (``.summary()``: one log line). Decoded images
    stay in memory up to ``cfg.data.cache_mb`` per process (shared out among its workers; persistent workers keep
    theirs). With ``crops.gram_size`` the Gram-teacher crops are rendered from the epoch of step ``gram_from_step``
    on (the Gram term's first step: before its epoch the batches have no ``"gram_crops"``); None: never.
    """
    files = scan_image_folder(cfg.data.train_dir, labeled=False, cache_file=cache_file)
    crops = cfg.data.crops
    workers = cfg.data.num_workers
    cache_bytes = cfg.data.cache_mb * 2**20 // max(1, workers)  # each worker process holds its own share
    masking = build_masking(cfg.masking, crops.global_size, cfg.model.patch_size, crops.n_global)
    if len(files) // world_size < cfg.data.batch_size:  # not one full batch per process: nothing to train on
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} x {world_size} process(es) is larger than the "
                          f"{len(files)} images in {cfg.data.train_dir}: lower data.batch_size or add images")
    sampler = EpochSampler(len(files), cfg.run.seed, rank, world_size, drop_last=True, batch_size=cfg.data.batch_size)
    gram_from_epoch = None if gram_from_step is None else gram_from_step // sampler.batches_per_epoch
    # the masks and the Gram crops read each sample's epoch
    sampler.with_epoch = masking is not None or (crops.gram_size is not None and gram_from_epoch != 0)
    if cfg.data.boxes is None:
        dataset = ImageFolderDataset(files, MultiCropTransform(crops, gram_from_epoch), cache_bytes=cache_bytes)
    else:
        if not Path(cfg.data.boxes).is_file():
            beside = files.root / Path(cfg.data.boxes).name
            raise AnnotationError(f"data.boxes={cfg.data.boxes}: no such file (the path is read from the working "
                                  f"directory, {Path.cwd()})"
                                  + (f"; the training folder has one: data.boxes={beside}" if beside.is_file() else ""))
        boxes = read_boxes(cfg.data.boxes, files.root, paths=files.paths)
        if not boxes.report["images_with_boxes"] and cfg.odis.no_box != "whole_image":  # else every image has [OBJ]
            r = boxes.report
            raise AnnotationError(
                f"boxes file {cfg.data.boxes} leaves no box to train on ({r['images']} images listed, "
                f"{r['boxes_outside']} boxes outside their image, {r['boxes_degenerate']} of zero width or height): "
                "the object term would be 0 for the whole run; give each box in its image's pixels, as COCO's "
                "[x, y, width, height]")
        transform = ObjectMultiCropTransform(crops, cfg.model.patch_size, cfg.odis.target_box, cfg.odis.no_box,
                                             ablation=cfg.odis.ablation, gram_from_epoch=gram_from_epoch)
        dataset = ImageFolderDataset(files, transform, boxes=boxes, cache_bytes=cache_bytes)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=torch.utils.data.BatchSampler(sampler, cfg.data.batch_size, drop_last=True),
        collate_fn=MultiCropCollate(crops, masking=masking),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.run.seed),
    )
    return loader, sampler


def build_eval_loader(
    root: str | Path,
    image_size: int,
    resize_size: int,
    batch_size: int,
    num_workers: int,
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
    std: tuple[float, float, float] = (0.229, 0.224, 0.225),
    cache_file: Path | None = None,
) -> torch.utils.data.DataLoader:
    """Labeled folder (class subfolders) -> batches {"image", "label", "index", "bad"}, in order."""
    files = scan_image_folder(root, labeled=True, cache_file=cache_file)
    dataset = ImageFolderDataset(files, EvalTransform(image_size, resize_size, mean, std))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_eval,
        persistent_workers=False,
    )
