"""Object-level k-NN on a labeled scene benchmark (``ssl-distill make-scenes``): every test object
classified from the train objects.

ODIS (Hızlı, Yıldız, Marttinen 2025, "Object-level Self-Distillation for Vision Pretraining", arXiv
2506.05409) reports k-NN "using masks at inference time": the [OBJ] token attends to the object's patches
only. Four features per object (:func:`ssl_distill.eval.box_features.extract_box_features`):

- ``obj``: the [OBJ] output on the whole scene with the box's patch mask (ODIS models only);
- ``crop``: the CLS output of the box crop resized to the view size;
- ``crop_native``: the CLS output of the box crop at the scene's scale, centred on a black canvas (the
  object as large as in the scene, not upsampled: [OBJ]'s fair comparison);
- ``scene``: the CLS output of the whole scene (every object of a scene gets the same feature: the
  image-level baseline, which cannot tell a scene's objects apart).

``--mode pixels`` needs no model: the box crop's raw pixels (grayscale, 28 x 28, mean removed,
:func:`~ssl_distill.eval.box_features.pixel_crop_feature`), the bar learned features must clear, as raw
pixels are for Fashion-MNIST's k-NN.

Classification is DINO's weighted k-NN (:func:`ssl_distill.weighted_knn.knn_classify`: cosine similarity,
``k = 20`` neighbours voting with ``exp(sim / T)``, ``T = 0.07``, faiss exact search), the labels are the
boxes' ``category_id`` (the ``categories`` list of ``train/boxes.json`` gives the classes; the test file
must name the same). The view is the whole scene resized to ``image_size`` (default: the scenes' side
rounded to a multiple of the patch size), normalized with the run's ``data.crops`` mean / std.

    ssl-distill object-knn RUN_DIR --scenes data/scenes [--mode all] [--precision fp32]
    ssl-distill object-knn --mode pixels --scenes data/scenes

Writes ``<run dir>/object_knn.json`` (``object_knn_random_init.json`` with ``--random-init``;
``<scenes>/object_knn_pixels.json`` for ``--mode pixels``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from ssl_distill.cli_args import object_knn_arguments as add_arguments  # options: torch-free
from ssl_distill.cli_args import tool_main
from ssl_distill.errors import DataError
from ssl_distill.weighted_knn import knn_classify

from .box_features import BOX_MODES, extract_box_features, pixel_crop_feature
from .features import ImageSettings
from .results import default_output, write_results
from .model import load_model

__all__ = ["add_arguments", "object_knn", "pixel_knn", "run", "NO_OBJ_TOKEN"]

NO_OBJ_TOKEN = "this model has no [OBJ] token (not an ODIS model), so mode obj cannot run"


def _split_files(scenes: Path) -> dict[str, Path]:
    files = {split: scenes / split / "boxes.json" for split in ("train", "test")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise DataError(f"{scenes} is not a make-scenes folder: missing {', '.join(missing)}")
    return files


def _class_index(train: Any, test: Any) -> tuple[list[str], dict[int, int]]:
    """Class names (train file's categories, in id order) and category id -> class index."""
    if not train.categories:
        raise DataError(f"{train.path} has no 'categories' list: object-knn needs each box's class")
    if {k: v for k, v in test.categories.items()} != train.categories:
        raise DataError(f"{train.path} and {test.path} name different categories")
    ids = sorted(train.categories)
    return [train.categories[i] for i in ids], {cid: j for j, cid in enumerate(ids)}


def _labels(category_ids: list[int], index: dict[int, int], where: Path) -> torch.Tensor:
    """Each box's category id -> its class index; an id outside the categories list is an error."""
    unknown = sorted({int(c) for c in category_ids if int(c) not in index})
    if unknown:
        raise DataError(f"{where}: boxes with category_id {unknown[:5]} not in its categories list "
                        "(object-knn needs a category on every box)")
    return torch.tensor([index[int(c)] for c in category_ids], dtype=torch.long)


def _default_image_size(bf: Any, patch_size: int) -> int:
    """The longer side of the split's first image, rounded to a multiple of the patch size."""
    from ssl_distill.data.folder import image_size

    from .box_features import UNREADABLE_HINT

    first = next(iter(bf.boxes), None)
    if first is None:
        raise DataError(f"{bf.path} lists no images")
    side = max(image_size(Path(bf.image_root) / first, UNREADABLE_HINT))
    return max(patch_size, int(round(side / patch_size)) * patch_size)


def object_knn(checkpoint: str | Path, scenes: str | Path, mode: str = "all", *, which: str = "teacher",
               random_init: bool = False, image_size: int | None = None, precision: str = "fp32",
               device: str = "auto", batch_size: int = 128, k: int = 20, temperature: float = 0.07,
               out: str | Path | None = None, log: Any = print) -> dict[str, Any]:
    """Object-level k-NN of a checkpoint's frozen backbone on ``scenes/{train,test}`` (module docstring).

    Args:
        mode: ``obj``, ``crop``, ``scene`` or ``all`` (every mode the model has: without an [OBJ]
            token, ``all`` runs crop and scene and says so; ``obj`` alone is an error).
        random_init: the same architecture with fresh weights (seeded with the run's seed,
            :func:`~ssl_distill.eval.model.load_model`).

    Returns the results written to ``out`` (default ``<run dir>/object_knn[_random_init].json``):
    ``top1`` / ``top5`` per mode under ``accuracy``, per-class top-1 under ``per_class``, feature counts.
    """
    from ssl_distill.data.boxes import read_boxes
    from ssl_distill.runtime import resolve_device

    if mode not in (*BOX_MODES, "all"):
        raise ValueError(f"mode must be one of {(*BOX_MODES, 'all')}, got {mode!r}")
    scenes = Path(scenes)
    files = _split_files(scenes)
    model = load_model(checkpoint, which, random_init=random_init)
    backbone, loaded = model.backbone, model.loaded
    modes, notes = _modes_of(bool(getattr(backbone, "has_obj_token", False)), mode, log)
    boxes = {split: read_boxes(f, f.parent) for split, f in files.items()}
    classes, index = _class_index(boxes["train"], boxes["test"])
    mean, std = model.normalization
    size = image_size or _default_image_size(boxes["train"], int(backbone.patch_size))
    settings = ImageSettings(size, size, mean, std)
    dev = resolve_device(device, key="device")
    feats = {split: extract_box_features(backbone, files[split].parent, boxes[split], modes, settings, device=dev,
                                         precision=precision, batch_size=batch_size)
             for split in ("train", "test")}
    labels = {split: _labels(f.labels.tolist(), index, files[split]) for split, f in feats.items()}
    results: dict[str, Any] = {
        "checkpoint": str(loaded.file), "which": "random_init" if random_init else loaded.source,
        "format": loaded.format, "scenes": str(scenes.resolve()), "classes": classes, "modes": modes,
        "k": k, "temperature": temperature, "image_size": size, "precision": precision, "mean": mean, "std": std,
        "n_train": int(labels["train"].numel()), "n_test": int(labels["test"].numel()),
        "n_train_images": len(feats["train"].file_names), "n_test_images": len(feats["test"].file_names),
        "notes": notes, "accuracy": {}, "per_class": {}, "details": {},
    }
    for m in modes:
        results["accuracy"][m], results["per_class"][m], results["details"][m] = _knn_entry(
            (feats["train"].features[m], labels["train"]), (feats["test"].features[m], labels["test"]), k,
            temperature, len(classes), feats["train"].meta["seconds"][m] + feats["test"].meta["seconds"][m])
    results["seconds_load"] = feats["train"].meta["seconds_load"] + feats["test"].meta["seconds_load"]
    if out is None:
        out = default_output(checkpoint, "object_knn", random_init)
    write_results(results, Path(out))
    results["out"] = str(out)
    return results


def _modes_of(has_obj: bool, mode: str, log: Any) -> tuple[list[str], list[str]]:
    """(the modes ``mode`` runs, notes): ``all`` is every mode the model has, leaving obj out with a note
    (logged) when it has no [OBJ] token; ``obj`` alone on such a model is a ValueError."""
    if mode == "obj" and not has_obj:
        raise ValueError(NO_OBJ_TOKEN)
    modes = list(BOX_MODES) if mode == "all" else [mode]
    notes: list[str] = []
    if not has_obj and "obj" in modes:
        modes.remove("obj")
        notes.append(NO_OBJ_TOKEN + "; running crop and scene only.")
        log(notes[-1])
    return modes, notes


def _knn_entry(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], k: int,
               temperature: float, num_classes: int,
               seconds_extract: float) -> tuple[dict[str, float], list[float | None], dict[str, Any]]:
    """k-NN of one feature of the test boxes against the train boxes ((N, D) features, (N,) labels each):
    (top-1 / top-5, per-class top-1, details: k used, dim, feature counts, extraction and search seconds)."""
    t0 = time.perf_counter()
    entry = knn_classify(*train, *test, ks=(k,), temperature=temperature, num_classes=num_classes)[f"k={k}"]
    details = {"k_used": entry["k"], "dim": int(train[0].shape[1]), "n_train_features": int(train[0].shape[0]),
               "n_test_features": int(test[0].shape[0]), "seconds_extract": seconds_extract,
               "seconds_search": time.perf_counter() - t0}
    return {"top1": entry["top1"], "top5": entry["top5"]}, entry["per_class"], details


def pixel_knn(scenes: str | Path, size: int = 28, *, k: int = 20, temperature: float = 0.07,
              out: str | Path | None = None) -> dict[str, Any]:
    """Object-level k-NN on the box crops' raw pixels (:func:`pixel_crop_feature`), no model: the baseline
    row of the scene table. Same classes, vote and output layout as :func:`object_knn` (mode ``pixels``);
    default output ``<scenes>/object_knn_pixels.json``."""
    from ssl_distill.data.boxes import read_boxes
    from ssl_distill.data.folder import decoded_image

    from .box_features import UNREADABLE_HINT

    if size < 1:
        raise ValueError(f"the pixel size must be >= 1, got {size}")
    scenes = Path(scenes)
    files = _split_files(scenes)
    boxes = {split: read_boxes(f, f.parent) for split, f in files.items()}
    classes, index = _class_index(boxes["train"], boxes["test"])
    t0 = time.perf_counter()
    feats, labels = {}, {}
    for split, bf in boxes.items():
        rows, cats = [], []
        for name in bf.boxes:
            xyxy, c = bf.boxes_for(name)
            if not len(xyxy):
                continue
            img = decoded_image(Path(bf.image_root) / name, UNREADABLE_HINT)
            rows += [pixel_crop_feature(img, b, size) for b in xyxy.tolist()]
            cats += [int(v) for v in c]
        feats[split] = torch.stack(rows) if rows else torch.zeros(0, size * size)
        labels[split] = _labels(cats, index, files[split])
    accuracy, per_class, details = _knn_entry((feats["train"], labels["train"]), (feats["test"], labels["test"]), k,
                                              temperature, len(classes), time.perf_counter() - t0)
    results: dict[str, Any] = {
        "checkpoint": None, "which": "pixels", "scenes": str(scenes.resolve()), "classes": classes,
        "modes": ["pixels"], "k": k, "temperature": temperature, "pixel_size": size,
        "n_train": int(labels["train"].numel()), "n_test": int(labels["test"].numel()), "notes": [],
        "accuracy": {"pixels": accuracy}, "per_class": {"pixels": per_class}, "details": {"pixels": details},
    }
    out = Path(out) if out is not None else scenes / "object_knn_pixels.json"
    write_results(results, out)
    results["out"] = str(out)
    return results


def run(args: argparse.Namespace) -> int:
    if args.mode == "pixels":
        res = pixel_knn(args.scenes, args.pixel_size, k=args.k, temperature=args.temperature, out=args.out)
    elif args.checkpoint is None:
        raise ValueError("object-knn needs a checkpoint (a run directory or file) for mode "
                         f"{args.mode!r}; only --mode pixels runs without one")
    else:
        res = object_knn(args.checkpoint, args.scenes, args.mode, which=args.which, random_init=args.random_init,
                         image_size=args.image_size, precision=args.precision, device=args.device,
                         batch_size=args.batch_size, k=args.k, temperature=args.temperature, out=args.out)
    for m, acc in res["accuracy"].items():
        d = res["details"][m]
        print(f"object k-NN {m:>5} (k={d['k_used']}, T={res['temperature']:g}): top-1 {acc['top1']:.2f}%  "
              f"top-5 {acc['top5']:.2f}%  [{d['n_train_features']} train / {d['n_test_features']} test features, "
              f"dim {d['dim']}, {d['seconds_extract']:.1f} s]")
    print(f"wrote {res['out']}")
    return 0


main = tool_main("object-knn", add_arguments, run)  # python -m ssl_distill.eval.object_knn


if __name__ == "__main__":
    raise SystemExit(main())
