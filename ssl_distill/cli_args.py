"""Every subcommand's options, defined without importing torch, timm or torchvision.

``ssl-distill --help``, a subcommand's ``--help``, an argument error and the commands that run no
model (``submit``, ``report``) then answer in a fraction of a second; :mod:`ssl_distill.cli` imports a
subcommand's (heavy) module only in its handler. Each ``<name>_arguments(parser)`` adds the options of
``ssl-distill <name>``; the tools re-export theirs as ``add_arguments``, and build their ``python -m`` entry
points with :func:`tool_main`.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

from ssl_distill.errors import run_command
from ssl_distill.eval_constants import DINOSEG_HEAD, EPS, LR_GRID, TAU

__all__ = [
    "corloc_arguments", "demo_arguments", "discover_arguments", "export_arguments", "knn_arguments",
    "linear_arguments", "make_scenes_arguments", "object_knn_arguments", "prepare_fmnist_arguments",
    "report_arguments", "submit_arguments", "tool_main", "train_arguments", "visualize_arguments",
]


def tool_main(name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
              run: Callable[[argparse.Namespace], int]) -> Callable[[Sequence[str] | None], int]:
    """``main(argv=None)`` of a tool's ``python -m`` entry point, the same as ``ssl-distill <name>``: ``argv``
    (default ``sys.argv[1:]``) parsed with that subcommand's options alone (same usage and argument errors),
    then ``run`` through the one error handler, :func:`ssl_distill.errors.run_command`."""

    def main(argv: Sequence[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=f"ssl-distill {name}", allow_abbrev=False)  # as the ssl-distill parser
        add_arguments(parser)
        return run_command(run, parser.parse_args(argv))

    return main


def train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``ssl-distill train`` (:func:`ssl_distill.engine.train.train`)."""
    p.add_argument("config", help="YAML recipe, e.g. configs/dino_vit_small16.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=0.001")
    p.add_argument("--fresh", action="store_true",
                   help="start over: the earlier run's files move into <run dir>/previous/<time>/")


def knn_arguments(k: argparse.ArgumentParser) -> None:
    """Options of ``ssl-distill knn`` (:func:`ssl_distill.eval.knn.knn_on_checkpoint`)."""
    k.add_argument("checkpoint", help="checkpoint file or run directory")
    k.add_argument("overrides", nargs="*", help="knn.* overrides, e.g. knn.image_size=28 knn.ks=[20]")
    k.add_argument("--train", help="labeled train folder (default: the run's knn.train_dir)")
    k.add_argument("--val", help="labeled val folder (default: the run's knn.val_dir)")
    k.add_argument("--which", default="teacher", choices=["teacher", "student"])
    k.add_argument("--random-init", action="store_true", help="evaluate the same architecture at random init")
    k.add_argument("--out", help="results JSON (default: <run dir>/knn.json)")
    k.add_argument("--key", help="checkpoint entry holding the weights (official files; default: detected)")
    k.add_argument("--layout", default="cls", choices=["cls", "mean", "cls+mean", "cls+mean-dino", "obj"],
                   help="obj: ODIS's [OBJ] token over every patch (from the [CLS] of a model without one)")
    k.add_argument("--boxes", metavar="NAME", help="with --layout obj: each folder's COCO boxes file of this name "
                   "(e.g. boxes.json); each image's [OBJ] reads the patches its boxes touch")
    k.add_argument("--n-last-blocks", type=_at_least(1), default=1, help="CLS tokens of the last n blocks")
    k.add_argument("--temperatures", type=_positive, nargs="+",
                   help="several T from one search (first: knn.temperature)")
    k.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="feature extraction (default: the run's knn.precision, fp32 as DINO; bf16: ~2x faster on CPU)")
    k.add_argument("--fp16-features", action="store_true", help="store features in float16 (half the memory)")
    k.add_argument("--train-chunk", type=_at_least(1), help="search the train set in chunks of N (bounded memory)")
    k.add_argument("--cache-dir", help="re-use features cached here while checkpoint and data are unchanged")


def prepare_fmnist_arguments(f: argparse.ArgumentParser) -> None:
    """Options of ``ssl-distill prepare-fmnist`` (:mod:`ssl_distill.data.fashion_mnist`)."""
    f.add_argument("out", nargs="?", default="data/fmnist")
    f.add_argument("--limit-per-class", type=_at_least(1), default=None)


def make_scenes_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``ssl-distill make-scenes`` (:mod:`ssl_distill.data.scenes`)."""
    p.add_argument("src", nargs="?", default=None, metavar="SRC",
                   help="labeled image folder <class>/<image> (default: data/fmnist/train, built if absent)")
    p.add_argument("out", metavar="OUT", help="writes OUT/train and OUT/test, each with boxes.json")
    p.add_argument("--n-train", type=int, default=2000, help="train scenes (default 2000)")
    p.add_argument("--n-test", type=int, default=1000, help="test scenes, objects from other source images (default 1000)")
    p.add_argument("--size", type=int, default=96, help="scene side in pixels (default 96)")
    p.add_argument("--min-objects", type=int, default=1, help="fewest items per scene (default 1)")
    p.add_argument("--max-objects", type=int, default=4, help="most items per scene (default 4; = --min-objects: "
                                                              "every scene holds that many)")
    p.add_argument("--min-scale", type=float, default=0.3, help="object's longer side / scene side, lowest (0.3)")
    p.add_argument("--max-scale", type=float, default=0.6, help="object's longer side / scene side, highest (0.6)")
    p.add_argument("--max-overlap", type=float, default=0.2,
                   help="largest share of an object's pixels that later objects may cover (default 0.2)")
    p.add_argument("--no-tint", dest="tint", action="store_false",
                   help="grayscale items and backgrounds keep their gray values (default: a random colour each)")
    p.add_argument("--background-scale", type=float, nargs=2, default=(0.25, 1.0), metavar=("LO", "HI"),
                   help="background crop side / the source's shorter side (default 0.25 1)")
    p.add_argument("--background", default="natural", choices=["natural", "black"],
                   help="natural (default): a texture or photo crop; black: all black, Fashion-MNIST's own setting "
                        "(with --no-tint: gray items on black, no background shortcut)")
    p.add_argument("--seed", type=int, default=0)


def object_knn_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``ssl-distill object-knn`` (:mod:`ssl_distill.eval.object_knn`)."""
    p.add_argument("checkpoint", nargs="?",
                   help="run directory, checkpoint file, or official DINO / iBOT / DINOv2 file (not for --mode pixels)")
    p.add_argument("--scenes", required=True, help="folder written by make-scenes (train/ and test/ with boxes.json)")
    p.add_argument("--mode", default="all", choices=["obj", "crop", "crop_native", "scene", "all", "pixels"],
                   help="obj: [OBJ] with each box's patch mask; crop: CLS of the box crop resized to the view; "
                        "crop_native: CLS of the box crop at the scene's scale on a black canvas; scene: CLS of the "
                        "whole scene; all (default): every mode the model has; pixels: the box crop's raw pixels, "
                        "no model")
    p.add_argument("--pixel-size", type=int, default=28,
                   help="--mode pixels: side the gray box crop is resized to (default 28, Fashion-MNIST's)")
    p.add_argument("--k", type=_at_least(1), default=20, help="neighbours (default 20)")
    p.add_argument("--temperature", type=_positive, default=0.07, help="vote weight exp(sim / T) (default 0.07)")
    p.add_argument("--image-size", type=_at_least(1), default=None,
                   help="eval view side (default: the scene side rounded to a multiple of the patch size)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="feature extraction: fp32 (default), bf16 (~2x faster on CPU) or fp16 (CUDA)")
    p.add_argument("--batch-size", type=_at_least(1), default=128, help="rows per forward pass")
    p.add_argument("--which", default="teacher", choices=["teacher", "student"])
    p.add_argument("--random-init", action="store_true", help="same architecture, random weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="results JSON (default: <run dir>/object_knn[_random_init].json; "
                                 "<scenes>/object_knn_pixels.json for --mode pixels)")


def demo_arguments(d: argparse.ArgumentParser) -> None:
    """Options of ``ssl-distill demo`` (:func:`ssl_distill.demo.run_demo`)."""
    d.add_argument("overrides", nargs="*")
    d.add_argument("--config", default=None, help="recipe (default: configs/dinov2_style_tiny_fmnist.yaml)")
    d.add_argument("--data", default="data/fmnist")
    d.add_argument("--fresh", action="store_true")
    d.add_argument("--limit-per-class", type=_at_least(1), default=None,
                   help="first N images of each class per split (a quick try-out; default: all)")


def report_arguments(r: argparse.ArgumentParser) -> None:
    """Options of ``ssl-distill report`` (:mod:`ssl_distill.report`)."""
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (finished, running or older)")
    r.add_argument("--out", default=None,
                   help="figure file (.png); the Markdown table goes beside it as .md (default: "
                        "RUN_DIR/report.png for one run, report.png here for several)")
    r.add_argument("--names", nargs="+", default=None, help="legend names, one per run (default: folder names)")
    r.add_argument("--dpi", type=int, default=110, help="figure resolution")


def linear_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ssl-distill linear`` (:mod:`ssl_distill.eval.linear`)."""
    p = parser
    p.add_argument("checkpoint", help="run directory, checkpoint file, or official DINO / iBOT / DINOv2 file")
    p.add_argument("--train", default=None,
                   help="labeled train folder, root/<class>/<image> (default: the run's knn.train_dir)")
    p.add_argument("--val", default=None, help="labeled test folder, same classes (default: the run's knn.val_dir)")
    p.add_argument("--mode", choices=["fast", "faithful", "logreg"], default="fast")
    p.add_argument("--out", default=None, help="results JSON (default: <run dir>/linear_<mode>.json)")
    p.add_argument("--which", choices=["teacher", "student"], default=None)
    p.add_argument("--key", default=None, help="checkpoint entry holding the weights (default: detected)")
    p.add_argument("--num-heads", type=_at_least(1), default=None, help="attention heads, for non-standard widths")
    g = p.add_argument_group("images and features")
    g.add_argument("--image-size", type=_at_least(1), default=None, help="center crop (default: run config, else 224)")
    g.add_argument("--resize-size", type=_at_least(1), default=None,
                   help="shorter side before cropping (default 256/224 x)")
    g.add_argument("--mean", type=float, nargs=3, default=None)
    g.add_argument("--std", type=_positive, nargs=3, default=None)
    g.add_argument("--batch-size", type=_at_least(1), default=128,
                   help="images per forward pass (faithful: per SGD step)")
    g.add_argument("--num-workers", type=_at_least(0), default=2)
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="feature extraction (default: the run's knn.precision, fp32 as DINO; bf16: ~2x faster on CPU)")
    g.add_argument("--device", default="auto")
    g.add_argument("--feature-dtype", choices=["float32", "float16"], default="float32")
    g.add_argument("--cache-dir", default=None, help="feature cache (default: <out dir>/features)")
    g.add_argument("--no-cache", action="store_true", help="extract every time, write no cache")
    f = p.add_argument_group("fast mode")
    f.add_argument("--blocks", type=int, nargs="+", default=[1, 4], help="last-n-block choices of the grid")
    f.add_argument("--lrs", type=_positive, nargs="+", default=list(LR_GRID), help="base lrs (scaled by batch/256)")
    f.add_argument("--head-batch-size", type=_at_least(1), default=256,
                   help="SGD batch of the heads (lrs scale by batch / 256)")
    f.add_argument("--holdout", type=float, default=0.1, help="share of train held out for head selection")
    f.add_argument("--head-precision", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="GEMMs of the head grid: fp32 (default, as DINO's / DINOv2's heads), bf16 (faster, "
                        "opt-in), auto (bf16 on CUDA and on CPUs with native bf16, else fp32)")
    f.add_argument("--epochs", type=_at_least(1), default=None,
                   help="fast: DINOv2's 12,500 iterations, at least 10 epochs; faithful: 100")
    f.add_argument("--standardize", action="store_true",
                   help="fast: z-score features with train statistics first (not in DINOv2's protocol)")
    f.add_argument("--seed", type=int, default=0)
    d = p.add_argument_group("faithful mode (DINO eval_linear)")
    d.add_argument("--lr", type=_positive, default=0.001, help="scaled by batch / 256")
    d.add_argument("--n-last-blocks", type=_at_least(1), default=None,
                   help="CLS tokens of the last n blocks (faithful default 4, DINO's ViT-S setting; logreg default 1)")
    d.add_argument("--avgpool", action="store_true", help="add the mean patch token (DINO ViT-B: n=1 + avgpool)")
    d.add_argument("--val-freq", type=_at_least(1), default=1)
    d.add_argument("--checkpoint-every", type=_at_least(0), default=0, help="also checkpoint every N steps")
    d.add_argument("--stop-after-steps", type=_at_least(1), default=None,
                   help="stop (checkpointed) after N steps in total")
    r = p.add_argument_group("logreg mode")
    r.add_argument("--cs", type=_positive, nargs="+", default=[0.01, 0.1, 1.0, 10.0],
                   help="inverse regularisation grid")
    r.add_argument("--layout", choices=["cls", "mean", "cls+mean", "cls+mean-dino", "obj"], default="cls")
    r.add_argument("--max-iter", type=_at_least(1), default=1000)
    r.add_argument("--boxes", metavar="NAME", help="with --layout obj: each folder's COCO boxes file of this name "
                   "(e.g. boxes.json); each image's [OBJ] reads the patches its boxes touch")


def _head(text: str) -> int | str:
    """``--dinoseg-head``: a head index, or ``mean``."""
    if text == "mean":
        return text
    try:
        head = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a head index or 'mean', got {text!r}") from None
    if head < 0:
        raise argparse.ArgumentTypeError(f"a head index is >= 0, got {head}")
    return head


def discover_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ssl-distill discover`` (:mod:`ssl_distill.eval.discover`)."""
    parser.add_argument("checkpoint", help="run directory, checkpoint file, or official DINO / iBOT / DINOv2 file")
    parser.add_argument("--images", help="image folder (default: JPEGImages/ of --voc; needed with --coco or alone)")
    gt = parser.add_mutually_exclusive_group()
    gt.add_argument("--voc", help="Pascal VOC folder: discover on its split and report CorLoc")
    gt.add_argument("--coco", help="COCO-style JSON: discover on its images and report CorLoc")
    parser.add_argument("--split", default="trainval", help="VOC ImageSets/Main split (default: trainval)")
    parser.add_argument("--out", help="output folder (default: <run dir>/discover[_random_init])")
    parser.add_argument("--masks", action="store_true", help="also write per-image foreground masks (PNG)")
    parser.add_argument("--heatmaps", action="store_true", help="also write the eigenvector heat maps (PNG)")
    parser.add_argument("--tau", type=float, default=TAU, help="similarity threshold (default 0.2)")
    parser.add_argument("--eps", type=float, default=EPS, help="weight of dissimilar pairs (default 1e-5)")
    parser.add_argument("--solver", default="auto", choices=["auto", "lanczos", "dense"],
                        help="eigen-solver: Lanczos on the deflated standard form, scipy's dense generalized "
                             "solve (the reference), or auto (dense up to 256 tokens)")
    parser.add_argument("--dinoseg", action="store_true",
                        help="DINO-seg instead of TokenCut: the box of the largest component of one head's [CLS] "
                             "attention kept to 60%% of its mass (the LOST / TokenCut baseline)")
    parser.add_argument("--dinoseg-head", type=_head, default=None,
                        help=f"DINO-seg's head: an index, or 'mean' of the heads (default {DINOSEG_HEAD}, LOST's, "
                             "or 'mean' on models with fewer heads)")
    parser.add_argument("--which", default="teacher", choices=["teacher", "student"])
    parser.add_argument("--random-init", action="store_true", help="same architecture, random weights")
    parser.add_argument("--max-side", type=_at_least(1), default=None,
                        help="shrink images whose longer side exceeds this")
    parser.add_argument("--limit", type=_at_least(1), default=None, help="only the first N images")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="backbone forward: fp32 (default) or bf16 / fp16 autocast (faster)")


def corloc_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ssl-distill corloc`` (:mod:`ssl_distill.eval.corloc`)."""
    parser.add_argument("boxes", help="predicted boxes (COCO-style JSON, e.g. discovery's boxes.json)")
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--voc", help="Pascal VOC folder with the ground truth")
    g.add_argument("--coco", help="COCO-style JSON with the ground truth")
    parser.add_argument("--split", default="trainval", help="VOC ImageSets/Main split (default trainval)")
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--skip-difficult", action="store_true")


def export_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ssl-distill export`` (:mod:`ssl_distill.eval.export`)."""
    parser.add_argument("checkpoint", help="checkpoint file (ours or official DINO / iBOT / DINOv2) or run directory")
    parser.add_argument("out", help="output file: .safetensors (default format) or .pth")
    parser.add_argument("--which", choices=["teacher", "student"], default=None,
                        help="teacher (default where a file holds both) or student")
    parser.add_argument("--key", default=None, help="top-level entry holding the weights (default: detected)")
    parser.add_argument("--format", dest="fmt", choices=["safetensors", "pth"], default=None,
                        help="default: from the output suffix")
    parser.add_argument("--num-heads", type=_at_least(1), default=None, help="head count, for non-standard widths")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output file (never a training checkpoint or the file read)")


def visualize_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ssl-distill visualize`` (:mod:`ssl_distill.eval.visualize`)."""
    parser.add_argument("checkpoint", help="run directory, checkpoint file, or official DINO / iBOT / DINOv2 file")
    parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", help="output folder (default: <run dir>/attention[_random_init])")
    parser.add_argument("--threshold", type=float, default=0.6,
                        help="keep the smallest set of patches holding this fraction of each head's mass (0: off)")
    parser.add_argument("--rollout", action="store_true", help="also compute attention rollout across all blocks")
    parser.add_argument("--head-fusion", default="mean", choices=["mean", "max", "min"], help="rollout head fusion")
    parser.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: drop this fraction of weakest weights")
    parser.add_argument("--no-pca", action="store_true", help="skip the PCA of patch features")
    parser.add_argument("--max-side", type=_at_least(1), default=None,
                        help="shrink images whose longer side exceeds this")
    parser.add_argument("--which", default="teacher", choices=["teacher", "student"])
    parser.add_argument("--random-init", action="store_true", help="same architecture, random weights")
    parser.add_argument("--device", default="auto")


def _at_least(low: int):  # noqa: ANN202 (an argparse type)
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return parse


def _positive(text: str) -> float:
    """An argparse type: a finite number > 0 (learning rates, temperatures, memory, regularisation)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def submit_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``ssl-distill submit`` (:mod:`ssl_distill.launch.submit`)."""
    p.add_argument("config", help="YAML recipe, e.g. configs/dino_vit_small16.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for ssl-distill train")
    p.add_argument("--nodes", type=_at_least(1), default=1)
    p.add_argument("--gpus-per-node", type=_at_least(0), default=0, help="one task per GPU; 0: CPU tasks")
    p.add_argument("--tasks-per-node", type=_at_least(1), default=None,
                   help="processes per node (default: --gpus-per-node, or 1 on CPU)")
    p.add_argument("--cpus-per-task", type=_at_least(1), default=None, help="also the torch thread count of each task")
    p.add_argument("--mem-gb", type=_positive, default=None, help="memory per node")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--exclude", default=None, help="nodes to avoid")
    p.add_argument("--time", type=_at_least(1), default=60 * 24, help="time limit in minutes (default 1440)")
    p.add_argument("--job-name", default=None, help="default: ssl-<output dir name>")
    p.add_argument("--signal-delay", type=_at_least(0), default=120,
                   help="seconds before the time limit at which SLURM sends SIGUSR2 (checkpoint + requeue)")
    p.add_argument("--max-requeues", type=_at_least(0), default=None, help="sets run.max_requeues")
    p.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm-arg mail_type=END (repeatable)")
    p.add_argument("--local", action="store_true", help="run here through submitit's local executor")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its last log record")
