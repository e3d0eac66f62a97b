"""The README's main job: Fashion-MNIST folders -> pretraining (online k-NN curve) -> k-NN -> report.

The default recipe is ``configs/dinov2_style_tiny_fmnist.yaml`` (DINOv2's objective: the best of DINO,
iBOT, AttMask and DINOv2-style at one wall-clock budget, experiments/compare_objectives.py); any other
recipe runs with ``--config``.

The demo ends by writing ``<run dir>/report.png`` and ``report.md`` (``ssl-distill report`` of its
run directory); the README's figure, ``docs/demo_report.png``, is that file copied:
``cp runs/fmnist_demo/report.png docs/demo_report.png``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .atomic import check_output_folder
from .config import ConfigError, config_to_dict, load_config
from .data.fashion_mnist import CLASSES, build_fashion_mnist_folders
from .engine.train import train
from .report import write_report

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dinov2_style_tiny_fmnist.yaml"


def run_demo(config: str | None = None, data_dir: str = "data/fmnist", overrides: list[str] | None = None,
             fresh: bool = False, limit_per_class: int | None = None) -> dict:
    """Runs the demo end to end: prints the online k-NN curve while pretraining, k-NN top-1 at random init
    and after pretraining, and writes the report figure and table into the run directory.

    ``limit_per_class`` keeps the first N images of each class in both splits (a quick try-out; the
    README's figures use all of them)."""
    from ssl_distill.eval.knn import knn_on_checkpoint

    t0 = time.perf_counter()
    root = Path(data_dir).expanduser().resolve()  # where build_fashion_mnist_folders writes them
    overrides = [
        f"data.train_dir={root / 'train'}",
        f"knn.train_dir={root / 'train'}",
        f"knn.val_dir={root / 'val'}",
        *(overrides or []),
    ]
    # the settings first: a typo costs its one line, not the 70,000 images written before it
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    check_output_folder(cfg.run.output_dir, "run.output_dir")
    if limit_per_class is not None and limit_per_class * len(CLASSES) < cfg.data.batch_size:
        raise ConfigError(f"--limit-per-class {limit_per_class} keeps {limit_per_class * len(CLASSES)} training "
                          f"images, fewer than one batch of data.batch_size={cfg.data.batch_size}: give "
                          f"--limit-per-class {-(-cfg.data.batch_size // len(CLASSES))} or more")
    build_fashion_mnist_folders(root, limit_per_class=limit_per_class)
    print(f"[demo] data ready in {time.perf_counter() - t0:.0f}s; run directory {cfg.run.output_dir}")

    t1 = time.perf_counter()
    train(cfg, fresh=fresh)
    t_train = time.perf_counter() - t1
    run_dir = Path(cfg.run.output_dir)
    init = knn_on_checkpoint(run_dir, random_init=True)  # precision: the run's knn.precision (fp32, as DINO)
    final = knn_on_checkpoint(run_dir)
    k20_init, k20 = init["accuracy"]["k=20"]["top1"], final["accuracy"]["k=20"]["top1"]
    summary = {
        "knn_top1_k20_random_init": k20_init,
        "knn_top1_k20_pretrained": k20,
        "knn_pretrained": final["accuracy"],
        "knn_precision": final["precision"],
        "train_minutes": t_train / 60,
        "total_minutes": (time.perf_counter() - t0) / 60,
        "config": config_to_dict(cfg),
    }
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    report = write_report([run_dir])  # after knn.json: the table lists the final k-NN too
    summary["report"] = str(report.figure)
    print(f"[demo] k-NN top-1 (k=20) on Fashion-MNIST test: random init {k20_init:.2f}%  ->  "
          f"pretrained {k20:.2f}%  ({final['precision']} features; pretraining {t_train / 60:.1f} min, total "
          f"{summary['total_minutes']:.1f} min)")
    print(f"[demo] report: {report.figure} and {report.table} (the README's figure: "
          f"cp {report.figure} docs/demo_report.png)")
    return summary
