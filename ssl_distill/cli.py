"""The ``ssl-distill`` command: train, submit, knn, linear, export, discover, corloc, visualize, demo, report,
make-scenes, object-knn.

Start-up is kept light: the parser and the error handling import no torch, timm or torchvision
(options in :mod:`ssl_distill.cli_args`, user errors in :mod:`ssl_distill.errors`); a subcommand
imports what it needs in its handler, so ``--help``, argument errors, ``submit`` and ``report``
answer in a fraction of a second (``benchmarks/bench_cli.py``; ``tests/test_cli_light.py``).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from . import cli_args
from .config import load_config
from .errors import run_command
from .memory import keep_freed_memory


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

    from .eval.knn import knn_on_checkpoint
    from .models.frozen_features import FeatureSpec

    results = knn_on_checkpoint(
        args.checkpoint, train_dir=args.train, val_dir=args.val, which=args.which,
        overrides=args.overrides, out=args.out, random_init=args.random_init, key=args.key,
        features=FeatureSpec(args.layout, args.n_last_blocks), temperatures=args.temperatures,
        feature_dtype=torch.float16 if args.fp16_features else torch.float32, cache_dir=args.cache_dir,
        train_chunk=args.train_chunk, precision=args.precision, boxes=args.boxes,
    )
    for key, val in results["accuracy"].items():
        print(f"k-NN {key}: top-1 {val['top1']:.2f}%  top-5 {val['top5']:.2f}%")
    for note in results["notes"]:
        print(f"note: {note}")
    return 0


def _prepare_fmnist(args: argparse.Namespace) -> int:
    from .data.fashion_mnist import build_fashion_mnist_folders

    out = build_fashion_mnist_folders(args.out, limit_per_class=args.limit_per_class)
    print(f"Fashion-MNIST image folders in {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(config=args.config, data_dir=args.data, overrides=args.overrides, fresh=args.fresh,
             limit_per_class=args.limit_per_class)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    report = write_report(args.runs, out=args.out, names=args.names, dpi=args.dpi)
    print(report.markdown)
    print(f"figure: {report.figure}\ntable:  {report.table}")
    return 0


def _linear(args: argparse.Namespace) -> int:
    from .eval import linear

    return linear.run(args)


def _export(args: argparse.Namespace) -> int:
    from .eval import export

    return export.run(args)


def _discover(args: argparse.Namespace) -> int:
    from .eval import discover

    return discover.run(args)


def _corloc(args: argparse.Namespace) -> int:
    from .eval import corloc

    return corloc.run(args)


def _visualize(args: argparse.Namespace) -> int:
    from .eval import visualize

    return visualize.run(args)


def _make_scenes(args: argparse.Namespace) -> int:
    from .data import scenes

    return scenes.run(args)


def _object_knn(args: argparse.Namespace) -> int:
    from .eval import object_knn

    return object_knn.run(args)


def _submit(args: argparse.Namespace) -> int:
    from .launch import submit

    return submit.run(args)


#: (name, help, options, handler) of every subcommand; the options are torch-free (cli_args)
COMMANDS: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]], ...] = (
    ("train", "pretrain (resumes automatically from the run directory)", cli_args.train_arguments, _train),
    ("knn", "weighted k-NN evaluation of a checkpoint or run directory", cli_args.knn_arguments, _knn),
    ("prepare-fmnist", "write Fashion-MNIST (Debian dataset-fashion-mnist) as image folders",
     cli_args.prepare_fmnist_arguments, _prepare_fmnist),
    ("demo", "Fashion-MNIST: build folders, k-NN at init, pretrain (online k-NN), k-NN, report figure",
     cli_args.demo_arguments, _demo),
    ("report", "figure (PNG) + Markdown table of one or more runs: losses, collapse monitors, schedules, "
     "images/s, online k-NN, against step and wall-clock", cli_args.report_arguments, _report),
    ("linear", "linear probe: fast grid on cached features, DINO's faithful protocol, or logistic regression",
     cli_args.linear_arguments, _linear),
    ("export", "write a clean backbone file (safetensors or state dict) from any supported checkpoint",
     cli_args.export_arguments, _export),
    ("discover", "object discovery (TokenCut normalized cut, or DINO-seg): boxes, masks, heat maps",
     cli_args.discover_arguments, _discover),
    ("corloc", "CorLoc of predicted boxes against VOC or COCO ground truth", cli_args.corloc_arguments,
     _corloc),
    ("visualize", "attention maps, PCA of patch features and attention rollout", cli_args.visualize_arguments,
     _visualize),
    ("submit", "the train command as a submitit job on SLURM (or --local), with checkpoint + requeue",
     cli_args.submit_arguments, _submit),
    ("make-scenes", "labeled multi-object scenes (train / test, COCO boxes with classes) from a labeled folder",
     cli_args.make_scenes_arguments, _make_scenes),
    ("object-knn", "object-level k-NN on make-scenes folders: [OBJ] with box masks, box-crop CLS, scene CLS",
     cli_args.object_knn_arguments, _object_knn),
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; builds without importing torch (see :mod:`ssl_distill.cli_args`)."""
    p = argparse.ArgumentParser(prog="ssl-distill", description="Self-distillation pretraining for ViTs",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    for name, text, add_arguments, handler in COMMANDS:
        # options by their whole names only: argparse would read `knn --k 20` as `--key 20`
        sp = sub.add_parser(name, help=text, allow_abbrev=False)
        add_arguments(sp)
        sp.set_defaults(func=handler)
    return p


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; returns its exit code.

    A user error prints one line to stderr and raises SystemExit(1) instead of a traceback
    (:func:`ssl_distill.errors.run_command`).
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
    keep_freed_memory()  # training and the evaluations: large tensors reuse freed memory (ssl_distill/memory.py)
    return run_command(args.func, args)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
