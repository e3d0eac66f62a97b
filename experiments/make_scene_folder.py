"""Write the labeled multi-object scene benchmark: a thin caller of ``ssl-distill make-scenes``.

The generator lives in :mod:`ssl_distill.data.scenes` (objects from a labeled folder, default Fashion-MNIST,
pasted on scikit-image textures and photo crops; ``OUT/train`` and ``OUT/test`` with COCO ``boxes.json``
carrying each object's class; disjoint source objects). This script used to write unlabeled scenes of its
own (shapes filled with photos plus an optional Fashion-MNIST item); those scenes are now the labeled
benchmark's, so there is one generator. Any image-folder consumer (DINO / iBOT pretraining on
``OUT/train``, ``ssl-distill discover --coco OUT/test/boxes.json``) reads them as before. The evaluation
scenes of ``benchmarks/bench_ncut.py`` still come from ``tests/scenes.py``.

    python experiments/make_scene_folder.py [SRC] OUT [--n-train 2000] [--n-test 1000] [--size 96] [--seed 0]
"""
from __future__ import annotations

import sys

from ssl_distill.cli import run

if __name__ == "__main__":
    sys.exit(run(["make-scenes", *sys.argv[1:]]))
