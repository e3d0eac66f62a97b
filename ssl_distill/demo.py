"""The README's main job: Fashion-MNIST folders -> k-NN at init -> DINO pretraining -> k-NN."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import config_to_dict, load_config
from .data.fashion_mnist import build_fashion_mnist_folders
from .engine.train import train

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dino_tiny_fmnist.yaml"


def run_demo(config: str | None = None, data_dir: str = "data/fmnist", overrides: list[str] | None = None,
             fresh: bool = False) -> dict:
    """Runs the demo end to end and prints k-NN top-1 at random init and after pretraining."""
    from ssl_distill.eval.evaluate import knn_on_checkpoint

    t0 = time.perf_counter()
    root = build_fashion_mnist_folders(data_dir)
    overrides = [
        f"data.train_dir={root / 'train'}",
        f"knn.train_dir={root / 'train'}",
        f"knn.val_dir={root / 'val'}",
        *(overrides or []),
    ]
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
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
    print(f"[demo] k-NN top-1 (k=20) on Fashion-MNIST test: random init {k20_init:.2f}%  ->  "
          f"DINO pretrained {k20:.2f}%  ({final['precision']} features; pretraining {t_train / 60:.1f} min, total "
          f"{summary['total_minutes']:.1f} min)")
    return summary
