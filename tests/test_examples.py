"""Every recipe starts and every command of the README runs, on tiny data.

Each file in ``configs/`` trains two steps on a small folder of scenes (with boxes, for ODIS) and resumes for one
more, with its own model where 2 CPU cores allow it (the Fashion-MNIST and scene recipes: their architecture,
prototypes and image sizes as they stand). The ImageNet-scale recipes (224 px crops, ViT-S/16 or ViT-B/16, up to
65536 prototypes) take minutes a step there, so those keep their objectives, width, patch size, crop counts,
schedules and precision but run at overridden sizes (:func:`recipe_overrides`): 2 blocks, 512 prototypes,
3 x 3-patch global crops and 2 x 2-patch local ones. Step keys beyond three steps (a Gram stage, a backbone
freeze) move into them (:func:`step_overrides`), and a recipe that continues a released DINOv3 file gets a
stand-in of its architecture.

The README's ``ssl-distill`` lines (the ones ``tests/test_readme.py`` parses) run in order in one working folder,
as a reader would type them; the paths they name that a reader brings (``/data/...``, an official checkpoint,
a VOC folder, a photo) are tiny stand-ins (:data:`STAND_INS`), and each line gets the additions
:func:`tiny_additions` lists (a step cap and the sizes above for training, a few scenes for make-scenes ...).
``torchrun`` starts 2 processes instead of 8; the two SLURM ``submit`` lines run up to the queue, where a
stand-in ``sbatch`` takes the job script (the one-node cluster's jobs are ``tests/test_launch.py``'s); the
``--local --wait`` one runs its job.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dinov3_reference import random_dinov3
from scenes import SKIMAGE_DATA, make_scenes, write_coco, write_voc
from ssl_distill import cli
from ssl_distill.checkpoints import load_file
from ssl_distill.config import Config, load_config
from ssl_distill.data.fashion_mnist import DEFAULT_SOURCE
from ssl_distill.engine.train import train
from ssl_distill.models import spec_from_config
from test_end_to_end import make_folder
from test_readme import CLI_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def is_imagenet_scale(cfg: Config) -> bool:
    """A recipe whose crops are ImageNet's 224 px (ViT-S/B with up to 65536 prototypes): too heavy to step
    on 2 cores in a test."""
    return cfg.data.crops.global_size >= 224


def recipe_overrides(cfg: Config) -> list[str]:
    """The sizes an ImageNet-scale recipe trains at here (see the module docstring; Gram crops at twice the
    global ones), then :func:`step_overrides`."""
    if not is_imagenet_scale(cfg):
        return step_overrides(cfg)
    p = cfg.model.patch_size
    gram = [f"data.crops.gram_size={6 * p}"] if cfg.data.crops.gram_size else []
    return ["model.depth=2", "model.out_dim=512", "model.hidden_dim=128",
            "model.bottleneck_dim=64", "ibot.patch_out_dim=512", f"model.img_size={3 * p}",
            f"data.crops.global_size={3 * p}", f"data.crops.local_size={2 * p}", *gram, *step_overrides(cfg)]


def step_overrides(cfg: Config) -> list[str]:
    """A recipe's step keys moved into the first steps of a 3-step run on a tiny folder: a Gram term that
    starts later from step 1 (its EMA-teacher snapshot before step 1, refreshes after steps 1 and 2), a backbone
    freeze for step 0 only."""
    g, out = cfg.gram, []
    if g.on and g.start_step > 0:
        out += ["gram.start_step=1", "gram.ramp_steps=1"]
        if g.it_load_ema_teacher >= 0:
            out.append("gram.it_load_ema_teacher=1")
        if g.update_frequency:
            out += ["gram.update_frequency=1", "gram.it_first_update=2"]
    if cfg.optim.freeze_backbone_steps:
        out.append("optim.freeze_backbone_steps=1")
    return out


def release_stand_in(cfg: Config, path: Path) -> str:
    """A released-layout DINOv3 file (random weights, 2 blocks) of a RoPE recipe's width, heads and patch, at
    ``path``, for a recipe that starts from one (``model.init_from``); returns that key's override."""
    width, _, heads = spec_from_config(cfg).dims()
    torch.save(random_dinov3(0, dim=width, depth=2, heads=heads, patch=cfg.model.patch_size).state_dict(), path)
    return f"model.init_from={path}"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """16 scenes of 96 px with their boxes (every recipe trains on them), and a labeled folder of two classes
    for the online k-NN of the recipes that run it."""
    base = tmp_path_factory.mktemp("examples")
    images, boxes = write_coco(base / "scenes", make_scenes(16, seed=0, size=96, max_objects=2))
    labeled = make_folder(base / "labeled", 6, 0)
    return {"base": base, "images": images, "boxes": boxes, "labeled": labeled}


def common_overrides(data: dict[str, Path], out: Path) -> list[str]:
    """What every recipe gets here: the tiny folders, the run directory, a small batch, no worker process, a
    line per step."""
    return [f"data.train_dir={data['images']}", f"knn.train_dir={data['labeled']}", f"knn.val_dir={data['labeled']}",
            f"run.output_dir={out}", "data.batch_size=4", "data.num_workers=0", "run.progress=false",
            "run.log_every=1", "run.threads=1"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_trains_two_steps_and_resumes_for_a_third(recipe: Path, tiny_data, tmp_path):
    out = tmp_path / "run"
    overrides = common_overrides(tiny_data, out)
    cfg = load_config(recipe, overrides)
    if cfg.data.boxes:
        overrides.append(f"data.boxes={tiny_data['boxes']}")
    if cfg.model.init_from:
        overrides.append(release_stand_in(cfg, tmp_path / "release.pth"))
    overrides += recipe_overrides(cfg)
    for stop in (2, 3):
        last = train(load_config(recipe, [*overrides, f"run.stop_at_step={stop}"]))
        assert last["step"] == stop and math.isfinite(last["loss"])
        assert load_file(out / "checkpoint.pth")["step"] == stop
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
             if "kind" not in json.loads(line)]
    assert steps == [1, 2, 3]  # the third step is the resumed run's, after the first two


# ----------------------------------------------------------------------------------------------------
# The README's commands
# ----------------------------------------------------------------------------------------------------
#: what a README path that the reader brings stands for here, relative to the working folder
STAND_INS = {
    "/data/my_images": "images",  # any folder of images: the tiny scenes
    "/data/labeled/train": "labeled/train",
    "/data/labeled/val": "labeled/val",
    "/data/photos": "VOCdevkit/VOC2007/JPEGImages",  # the photos discover boxes and corloc scores against VOC
    "/checkpoint/me/vits16": "checkpoint/me/vits16",
}
#: a stand-in ``sbatch`` (on PATH for the submit lines): records the job script, answers as sbatch does
FAKE_SBATCH = """#!/bin/sh
cat "$1" > "$(dirname "$0")/sbatch_script_$$"
echo "Submitted batch job 4242"
"""


def tiny_additions(argv: list[str], workspace: Path) -> list[str]:
    """What a README line gets here so that it runs in seconds: training and submit lines a 2-step cap, a
    small batch, no worker process (and an ImageNet-scale recipe the sizes of :func:`recipe_overrides`); the
    demo 10 images per class (one a class held out by the linear probe); make-scenes 12 scenes a split; the
    linear probes 2 epochs."""
    command = argv[0]
    if command in ("train", "submit", "demo"):
        extra = ["run.stop_at_step=2", "data.batch_size=4", "data.num_workers=0", "run.progress=false",
                 "run.threads=1"]
        if command == "demo":
            return [*extra, "--limit-per-class", "10"]
        return extra + recipe_overrides(load_config(workspace / argv[1], []))
    if command == "make-scenes":
        return ["--n-train", "12", "--n-test", "12"]
    if command == "linear":
        return ["--epochs", "2", "--num-workers", "0"]
    return []


README_IDS = [f"{i:02d} {' '.join(w)}"[:70] for i, w in enumerate(CLI_COMMANDS)]


class ReadmeWorkspace:
    """A working folder with the stand-ins, where the README's lines run once each, in order."""

    def __init__(self, root: Path) -> None:
        self.root, self.results = root, {}

    def run_through(self, index: int) -> tuple[int, str]:
        """Run every README line up to ``index`` not run yet; (exit code, output) of line ``index``."""
        for i in range(index + 1):
            if i not in self.results:
                self.results[i] = self._run(CLI_COMMANDS[i])
            if i < index and self.results[i][0] != 0:
                pytest.fail(f"README line {i} ({' '.join(CLI_COMMANDS[i])}) failed before this one")
        return self.results[index]

    def _run(self, words: list[str]) -> tuple[int, str]:
        words = [functools.reduce(lambda w, kv: w.replace(*kv), STAND_INS.items(), w) for w in words]
        if words[0] == "torchrun":  # a process per GPU: 2 processes here; a run of its own (the lines before
            # it train the same run directory on one process: the README's alternatives, not a sequence)
            words = [w.replace("--nproc_per_node=8", "--nproc_per_node=2") for w in words]
            argv = words[words.index("ssl_distill.cli") + 1:]
            cmd = [sys.executable, "-m", "torch.distributed.run", *words[1:], *tiny_additions(argv, self.root),
                   "--fresh"]
            res = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=600)
            return res.returncode, res.stdout + res.stderr
        argv = words[1:] + tiny_additions(words[1:], self.root)
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            mp.chdir(self.root)
            mp.setenv("PATH", f"{self.root / 'bin'}{os.pathsep}{os.environ['PATH']}")
            try:
                code = cli.run(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        return code, out.getvalue()


@pytest.fixture(scope="module")
def readme(tiny_data) -> ReadmeWorkspace:
    """The working folder: ``configs/``, the tiny image folders, three official checkpoints (a DINO ViT-S/16,
    a DINOv2 ViT-S/14 with registers and a released-layout DINOv3 ViT-S/16, 2 blocks each), a VOC folder, a photo, three short runs for the
    report's comparison, and the stand-in sbatch."""
    from test_checkpoints_official import official_vit

    ws = tiny_data["base"] / "readme"
    (ws / "bin").mkdir(parents=True)
    (ws / "configs").symlink_to(ROOT / "configs")
    (ws / "images").symlink_to(tiny_data["images"])
    make_folder(ws / "labeled" / "train", 6, 0)
    make_folder(ws / "labeled" / "val", 3, 1)
    write_voc(ws / "VOCdevkit" / "VOC2007", make_scenes(4, seed=1, size=64, max_objects=1))
    Image.open(SKIMAGE_DATA / "chelsea.png").convert("RGB").save(ws / "photo.jpg")
    torch.save(official_vit(0, depth=2, patch=16, grid=3, width=384), ws / "dino_deitsmall16_pretrain.pth")
    torch.save(official_vit(1, depth=2, patch=14, grid=4, width=384, layer_scale="ls", registers=4,
                            mask_token="dinov2"), ws / "dinov2_vits14_reg4_pretrain.pth")
    torch.save(random_dinov3(2, depth=2).state_dict(), ws / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    for name in ("dino", "ibot", "attmask"):
        out = ws / "runs" / name
        train(load_config(ROOT / "configs" / f"{name}_tiny_fmnist.yaml",
                          [*common_overrides(tiny_data, out), "run.stop_at_step=2", "monitor.knn_every_epochs=0"]))
    (ws / "bin" / "sbatch").write_text(FAKE_SBATCH)
    (ws / "bin" / "sbatch").chmod(0o755)
    return ReadmeWorkspace(ws)


@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_SOURCE / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="the README's demo needs the Debian package dataset-fashion-mnist")
@pytest.mark.parametrize("index", range(len(CLI_COMMANDS)), ids=README_IDS)
def test_every_readme_command_runs(index: int, readme: ReadmeWorkspace):
    code, output = readme.run_through(index)
    assert code == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
