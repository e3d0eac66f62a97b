"""What a model's object features encode on a make-scenes folder: the items' class, or a nuisance.

Each test object is classified from the train objects by the same weighted k-NN as ``object-knn`` (k = 20,
T = 0.07, faiss), with three label sets for the same features:

- ``class``: the item's class (what ``object-knn`` reports);
- ``item colour``: one of 10 k-means clusters (fit on train) of the mean RGB of the box's brighter half
  (mostly the item's pixels; the item's tint when ``make-scenes`` tints them);
- ``background``: one of 10 k-means clusters of the mean RGB of the scene outside all its boxes (the
  background crop the scene was pasted on; every object of a scene shares it).

A feature that gets the nuisance labels far above their majority share and the class near chance has
learned the nuisance. Modes: ``crop`` (CLS of the box crop), and ``obj`` ([OBJ] + box mask) for ODIS models.

Usage: python experiments/scene_shortcuts.py --scenes data/scenes56 RUN_DIR [RUN_DIR ...] [--random-init]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.cluster import KMeans

from ssl_distill.data.boxes import read_boxes
from ssl_distill.eval.box_features import BoxFeatures, extract_box_features
from ssl_distill.eval.features import ImageSettings
from ssl_distill.eval.model import load_model
from ssl_distill.hardware import hardware_line
from ssl_distill.weighted_knn import knn_classify


def colour_statistics(image_root: Path, feats: BoxFeatures) -> tuple[np.ndarray, np.ndarray]:
    """(item colour (N, 3), background colour (N, 3)), one row per box of ``feats``, in its row order."""
    item = np.zeros((len(feats.boxes), 3), np.float32)
    background = np.zeros_like(item)
    boxes = feats.boxes.round().long().tolist()  # make-scenes boxes are whole pixels
    for i, name in enumerate(feats.file_names):
        rows = (feats.image_index == i).nonzero().flatten().tolist()
        with Image.open(image_root / name) as im:
            arr = np.asarray(im.convert("RGB"), np.float32) / 255.0
        outside = np.ones(arr.shape[:2], bool)
        for r in rows:
            x0, y0, x1, y1 = boxes[r]
            outside[y0:y1, x0:x1] = False
            px = arr[y0:y1, x0:x1].reshape(-1, 3)
            item[r] = px[px.sum(1) >= np.median(px.sum(1))].mean(0)
        background[rows] = arr[outside].mean(0) if outside.any() else arr.reshape(-1, 3).mean(0)
    return item, background


def cluster_labels(train: np.ndarray, test: np.ndarray, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    km = KMeans(n, n_init=4, random_state=0).fit(train)
    return torch.from_numpy(km.labels_.astype(np.int64)), torch.from_numpy(km.predict(test).astype(np.int64))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run directories or checkpoints")
    ap.add_argument("--scenes", required=True)
    ap.add_argument("--random-init", action="store_true", help="also the first run's architecture at random init")
    args = ap.parse_args()
    print(hardware_line(), flush=True)
    scenes = Path(args.scenes)
    boxes = {s: read_boxes(scenes / s / "boxes.json", scenes / s) for s in ("train", "test")}
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # nuisance labels, from the first model's rows
    models = [(r, False) for r in args.runs] + ([(args.runs[0], True)] if args.random_init else [])
    print("| model | feature | class | item colour | background |\n|---|---|---|---|---|")
    for run, random_init in models:
        backbone, loaded = load_model(run, "teacher", random_init=random_init)
        crops = loaded.config.data.crops
        size = int(loaded.config.model.img_size)
        settings = ImageSettings(size, size, tuple(crops.mean), tuple(crops.std))
        modes = ["obj", "crop"] if getattr(backbone, "has_obj_token", False) else ["crop"]
        t0 = time.perf_counter()
        feats = {s: extract_box_features(backbone, scenes / s, boxes[s], modes, settings) for s in ("train", "test")}
        if not targets:
            colours = {s: colour_statistics(scenes / s, feats[s]) for s in ("train", "test")}
            targets = {"item colour": cluster_labels(colours["train"][0], colours["test"][0]),
                       "background": cluster_labels(colours["train"][1], colours["test"][1])}
        labels = {"class": (feats["train"].labels, feats["test"].labels), **targets}
        for mode in modes:
            cells = []
            for tr, te in labels.values():
                res = knn_classify(feats["train"].features[mode], tr, feats["test"].features[mode], te, ks=(20,),
                                   num_classes=int(max(tr.max(), te.max())) + 1)["k=20"]
                majority = 100 * torch.bincount(te).max().item() / te.numel()
                cells.append(f"{res['top1']:.1f}% ({majority:.1f}%)")
            name = f"{run} at random init" if random_init else run
            print(f"| {name} | {mode} | " + " | ".join(cells) + " |", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    print("(k-NN top-1 of each label set; in brackets, the test share of its most common label)")


if __name__ == "__main__":
    main()
