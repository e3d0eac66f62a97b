"""The ``ssl-distill`` command: train, submit, knn, linear, export, discover, corloc, visualize, demo."""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, load_config


def _train(args: argparse.Namespace) -> int:
    from .engine.train import train

    from .engine.distributed import DistEnv
    from .launch.submit import exit_code_after

    cfg = load_config(args.config, args.overrides)
    last = train(cfg, fresh=args.fresh)
    rank = DistEnv.from_environ().rank
    if rank == 0:
        print(json.dumps(last))
    return exit_code_after(last, rank)


def _knn(args: argparse.Namespace) -> int:
    import torch

    from .eval.evaluate import knn_on_checkpoint
    from .eval.features import FeatureSpec

    results = knn_on_checkpoint(
        args.checkpoint, train_dir=args.train, val_dir=args.val, which=args.which,
        overrides=args.overrides, out=args.out, random_init=args.random_init, key=args.key,
        features=FeatureSpec(args.layout, args.n_last_blocks), temperatures=args.temperatures,
        feature_dtype=torch.float16 if args.fp16_features else torch.float32, cache_dir=args.cache_dir,
        train_chunk=args.train_chunk, precision=args.precision,
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
    k.add_argument("--key", help="checkpoint entry holding the weights (official files; default: detected)")
    k.add_argument("--layout", default="cls", choices=["cls", "mean", "cls+mean", "cls+mean-dino"])
    k.add_argument("--n-last-blocks", type=int, default=1, help="CLS tokens of the last n blocks")
    k.add_argument("--temperatures", type=float, nargs="+", help="several T from one search (first: knn.temperature)")
    k.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="feature extraction (default: the run's knn.precision, fp32 as DINO; bf16: ~2x faster on CPU)")
    k.add_argument("--fp16-features", action="store_true", help="store features in float16 (half the memory)")
    k.add_argument("--train-chunk", type=int, help="search the train set in chunks of N (bounded memory)")
    k.add_argument("--cache-dir", help="re-use features cached here while checkpoint and data are unchanged")
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

    from .eval import corloc, discover, export, linear, visualize
    from .launch import submit

    for name, module, text in (
        ("linear", linear, "linear probe: fast grid on cached features, DINO's faithful protocol, or logistic regression"),
        ("export", export, "write a clean backbone file (safetensors or state dict) from any supported checkpoint"),
        ("discover", discover, "normalized-cut object discovery (TokenCut): boxes, masks, heat maps"),
        ("corloc", corloc, "CorLoc of predicted boxes against VOC or COCO ground truth"),
        ("visualize", visualize, "attention maps, PCA of patch features and attention rollout"),
        ("submit", submit, "the train command as a submitit job on SLURM (or --local), with checkpoint + requeue"),
    ):
        sp = sub.add_parser(name, help=text)
        module.add_arguments(sp)
        sp.set_defaults(func=module.run)
    return p


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; returns its exit code.

    A user error (bad config, data, checkpoint, annotations, non-finite loss, invalid argument)
    prints one line to stderr and raises SystemExit(1) instead of a traceback.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after the options
    takes_overrides = hasattr(args, "overrides")
    bad = [a for a in extra if a.startswith("-") or "=" not in a or not takes_overrides]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if takes_overrides:
        args.overrides = list(args.overrides or []) + extra
    from .data.folder import DataError
    from .engine.checkpoint import CheckpointError
    from .engine.train import NonFiniteLossError
    from .eval.corloc import AnnotationError

    try:
        return args.func(args)
    except ConfigError as e:
        message = f"config error: {e}"
    except (DataError, CheckpointError, NonFiniteLossError, AnnotationError, ValueError) as e:
        # ValueError: argument checks of the evaluation tools (e.g. a holdout fraction outside (0, 1))
        message = f"error: {e}"
    print(message, file=sys.stderr)
    raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
