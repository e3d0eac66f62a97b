"""The ``ssl-distill`` command: train, knn, prepare-fmnist, demo."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import ConfigError, load_config


def _train(args: argparse.Namespace) -> int:
    from .engine.train import train

    cfg = load_config(args.config, args.overrides)
    last = train(cfg, fresh=args.fresh)
    print(json.dumps(last))
    return 0


def _knn(args: argparse.Namespace) -> int:
    from .eval.evaluate import knn_on_checkpoint

    results = knn_on_checkpoint(
        args.checkpoint, train_dir=args.train, val_dir=args.val, which=args.which,
        overrides=args.overrides, out=args.out, random_init=args.random_init,
    )
    for key, val in results["accuracy"].items():
        print(f"k-NN {key}: top-1 {val['top1']:.2f}%  top-5 {val['top5']:.2f}%")
    return 0


def _prepare_fmnist(args: argparse.Namespace) -> int:
    from .data.fashion_mnist import build_fashion_mnist_folders

    out = build_fashion_mnist_folders(args.out, limit_per_class=args.limit_per_class)
    print(f"Fashion-MNIST image folders in {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(config=args.config, data_dir=args.data, overrides=args.overrides, fresh=args.fresh)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl-distill", description="Self-distillation pretraining for ViTs")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pretrain (resumes automatically from the run directory)")
    t.add_argument("config", help="YAML recipe, e.g. configs/dino_vit_small16.yaml")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=0.001")
    t.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    t.set_defaults(func=_train)

    k = sub.add_parser("knn", help="weighted k-NN evaluation of a checkpoint or run directory")
    k.add_argument("checkpoint", help="checkpoint file or run directory")
    k.add_argument("overrides", nargs="*", help="knn.* overrides, e.g. knn.image_size=28 knn.ks=[20]")
    k.add_argument("--train", help="labeled train folder (default: the run's knn.train_dir)")
    k.add_argument("--val", help="labeled val folder (default: the run's knn.val_dir)")
    k.add_argument("--which", default="teacher", choices=["teacher", "student"])
    k.add_argument("--random-init", action="store_true", help="evaluate the same architecture at random init")
    k.add_argument("--out", help="results JSON (default: <run dir>/knn.json)")
    k.set_defaults(func=_knn)

    f = sub.add_parser("prepare-fmnist", help="write Fashion-MNIST (Debian dataset-fashion-mnist) as image folders")
    f.add_argument("out", nargs="?", default="data/fmnist")
    f.add_argument("--limit-per-class", type=int, default=None)
    f.set_defaults(func=_prepare_fmnist)

    d = sub.add_parser("demo", help="Fashion-MNIST: build folders, k-NN at init, pretrain, k-NN")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--config", default=None, help="recipe (default: configs/dino_tiny_fmnist.yaml)")
    d.add_argument("--data", default="data/fmnist")
    d.add_argument("--fresh", action="store_true")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after the options
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = list(getattr(args, "overrides", []) or []) + extra
    from .data.folder import DataError
    from .engine.checkpoint import CheckpointError
    from .engine.train import NonFiniteLossError

    try:
        sys.exit(args.func(args))
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (DataError, CheckpointError, NonFiniteLossError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
