"""Every evaluation tool on DINOv3 models: official-layout files (tests/dinov3_reference.py at random weights, in
the released layout and the ``teacher_checkpoint.pth`` one; 4 storage tokens; a GELU and a SwiGLU model) give,
through each tool's own code path, the numbers of the reference architecture on the same weights: the k-NN /
linear features (every layout), the maps ``visualize`` draws, the keys TokenCut cuts and the attention DINO-seg
boxes. Registers never enter a patch output (every map is exactly the h x w grid). One slow end-to-end test: a
tiny DINOv3-style run trains, stops, resumes bit-identically and is evaluated from the command line.

Relative errors are normwise, as in test_dinov3_backbone.py: max |ours - reference| / max |reference|.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from dinov3_reference import DinoV3ViT, random_dinov3
from scenes import SKIMAGE_DATA
from ssl_distill.checkpoints import load_file
from ssl_distill.config import ConfigError, load_config
from ssl_distill.data.eval_transform import EvalTransform
from ssl_distill.data.folder import scan_image_folder
from ssl_distill.eval.discover import affinity, discover_image, ncut, prepare_image
from ssl_distill.eval.features import ImageSettings, extract_folder
from ssl_distill.eval.model import load_model
from ssl_distill.eval.visualize import compute_maps, high_norm_patches, pca_rgb
from ssl_distill.models import inspect as ins
from ssl_distill.models.frozen_features import FeatureExtractor, FeatureSpec
from test_dinov3_backbone import rel_err, save_release, save_teacher_checkpoint
from test_end_to_end import CONFIG, make_folder, tiny_overrides

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# ViT-S/16 (bf16-rounded periods, stored bf16, as the releases are said to hold them) and S+/16 (SwiGLU), 3 blocks
MODELS = {"vits16": dict(depth=3, bf16_periods=True), "vits16plus": dict(depth=3, ffn_ratio=6.0, swiglu=True)}
FILES = [f"{name}-{layout}" for name in MODELS for layout in ("release", "teacher")]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[DinoV3ViT, Path]]:
    root = tmp_path_factory.mktemp("dinov3_tools")
    out = {}
    for i, (name, kw) in enumerate(MODELS.items()):
        ref = random_dinov3(20 + i, **kw)
        dtype = torch.bfloat16 if kw.get("bf16_periods") else torch.float32
        out[f"{name}-release"] = ref, save_release(ref, root / f"dinov3_{name}_pretrain.pth", dtype)
        out[f"{name}-teacher"] = ref, save_teacher_checkpoint(ref, root / f"{name}_teacher_checkpoint.pth")
    return out


def photo(name: str, size: tuple[int, int]) -> Image.Image:
    """A scikit-image photo resized to (width, height)."""
    return Image.open(SKIMAGE_DATA / name).convert("RGB").resize(size, Image.Resampling.BICUBIC)


# ----------------------------------------------------------------------------------------------------
# k-NN and linear features
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", FILES)
def test_knn_and_linear_features_are_the_official_models(files, key: str, photo_folder: Path) -> None:
    """Every feature layout through FeatureExtractor, and extract_folder (the k-NN / linear path: eval transform,
    loader, cache key) on real photos: the reference's CLS tokens of the last blocks and its mean patch token;
    registers never enter the mean."""
    ref, path = files[key]
    model = load_model(path)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        last2 = ref.get_intermediate_layers(x, 2)
        cls = [o[:, 0] for o in last2]
        mean = last2[-1][:, 5:].mean(1)
        expected = {
            FeatureSpec("cls"): cls[-1],
            FeatureSpec("mean"): mean,
            FeatureSpec("cls", 2): torch.cat(cls, 1),
            FeatureSpec("cls+mean", 2): torch.cat([*cls, mean], 1),
            FeatureSpec("cls+mean-dino"): torch.stack([cls[-1], mean], -1).flatten(1),
        }
        for spec, want in expected.items():
            got = FeatureExtractor(model.backbone, spec)(x)
            assert got.shape == want.shape and rel_err(got, want) <= 1e-5, spec.name()
        # the mean over every token after [CLS] (registers included) is not what we compute
        assert rel_err(FeatureExtractor(model.backbone, FeatureSpec("mean"))(x), last2[-1][:, 1:].mean(1)) > 1e-3
    settings = ImageSettings(64, 80, MEAN, STD)
    feats = extract_folder(FeatureExtractor(model.backbone, FeatureSpec("cls+mean", 2)), photo_folder, settings,
                           num_workers=0, batch_size=4)
    transform = EvalTransform(64, 80, MEAN, STD)
    listed = scan_image_folder(photo_folder, labeled=True)
    images = torch.stack([transform(Image.open(listed.root / p).convert("RGB")) for p in listed.paths])
    with torch.no_grad():
        outs = ref.get_intermediate_layers(images, 2)
    want = torch.cat([outs[0][:, 0], outs[1][:, 0], outs[1][:, 5:].mean(1)], 1)
    assert feats.features.shape == (7, 3 * 384) and rel_err(feats.features, want) <= 1e-5


def test_an_evaluation_crop_that_is_not_whole_patches_is_refused_in_one_sentence(files, photo_folder: Path) -> None:
    model = load_model(files["vits16-release"][1])
    with pytest.raises(ValueError, match=r"crop of 72 px is not a multiple of the model's 16 px patches.*e\.g\. 64"):
        ImageSettings(72, 80).check_fits(model.backbone)
    ImageSettings(64, 80).check_fits(model.backbone)
    cfg = load_config(CONFIG, ["model.patch_size=8", "data.crops.global_size=32", "data.crops.local_size=16",
                               "knn.image_size=28", "monitor.knn_every_epochs=0", "monitor.knn_every_steps=1",
                               f"knn.train_dir={photo_folder}", f"knn.val_dir={photo_folder}"])
    from ssl_distill.engine.online_knn import OnlineKnn

    with pytest.raises(ConfigError, match=r"knn.image_size=28 .* not a multiple of model.patch_size=8"):
        OnlineKnn(cfg, Path("."), 10, 10, torch.device("cpu"), None)


# ----------------------------------------------------------------------------------------------------
# visualize and discover
# ----------------------------------------------------------------------------------------------------
def reference_maps(ref: DinoV3ViT, x: Tensor) -> dict[str, Tensor]:
    """What the figures show, computed on the reference model: per-head CLS -> patch attention renormalised over
    the patches, the rollout, the attention shares, the registers' maps, the pre-norm patch norms and tokens."""
    h, w = x.shape[-2] // 16, x.shape[-1] // 16
    with torch.no_grad():
        attn = ref.attentions(x)
        feats = ref.forward_features(x)
    last = attn[-1][0]  # (heads, N, N)
    cls = last[:, 0, 5:]
    roll = None
    for a in attn:
        roll = ins.rollout_update(roll, a)
    roll = roll[0, 0, 5:] / roll[0, 0, 5:].sum()
    parts = lambda rows: torch.stack([rows[..., :1].sum(-1), rows[..., 1:5].sum(-1), rows[..., 5:].sum(-1)], -1)  # noqa: E731
    return {"attention": (cls / cls.sum(-1, keepdim=True)).reshape(-1, h, w), "rollout": roll.reshape(h, w),
            "cls_mass": parts(last[:, 0]), "patch_mass": parts(last[:, 5:]).mean((0, 1)),
            "reg_reads": last[:, 1:5, 5:].mean(0).reshape(4, h, w),
            "reg_read_by": last[:, 5:, 1:5].mean(0).T.reshape(4, h, w),
            "patch_norms": feats["x_prenorm"][0, 5:].norm(dim=-1).reshape(h, w),
            "patch": feats["x_norm_patchtokens"][0].reshape(h, w, -1)}


@pytest.mark.parametrize("key", FILES)
def test_visualize_maps_are_the_official_models(files, key: str) -> None:
    ref, path = files[key]
    bb = load_model(path).backbone
    img = photo("chelsea.png", (135, 90))  # cropped to 128 x 80: a 5 x 8 patch grid
    maps = compute_maps(bb, img, MEAN, STD, threshold=0.6, rollout=True)
    arr = torch.from_numpy(maps.image.astype(np.float32)).permute(2, 0, 1) / 255
    x = ((arr - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))[None]
    want = reference_maps(ref, x)
    assert maps.image.shape == (80, 128, 3)
    for name in ("attention", "rollout", "cls_mass", "patch_mass", "reg_reads", "reg_read_by", "patch_norms"):
        got = torch.from_numpy(np.asarray(getattr(maps, name)))
        assert got.shape == want[name].shape, name  # the h x w grid exactly: no register in any map
        assert rel_err(got, want[name]) <= 1e-5, name
    assert maps.attention.shape == (6, 5, 8) and maps.reg_reads.shape == (4, 5, 8)
    np.testing.assert_allclose(maps.cls_mass.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(maps.pca, pca_rgb(want["patch"], exclude=high_norm_patches(want["patch_norms"])),
                               atol=1e-4)
    assert "to the 4 registers" in maps.caption()


@pytest.mark.parametrize("key", FILES)
def test_discovery_cuts_the_official_models_unrotated_keys_and_boxes_its_attention(files, key: str) -> None:
    ref, path = files[key]
    bb = load_model(path).backbone
    img = photo("coffee.png", (150, 100))  # padded to 160 x 112: a 7 x 10 grid
    x, size = prepare_image(img, 16, MEAN, STD)
    with torch.no_grad():
        keys = ins.last_block_keys(bb, x)
        want = ref.last_content_keys(x)
    assert keys.shape == (1, 70, 384) and rel_err(keys, want) <= 1e-5
    res = discover_image(bb, img, mean=MEAN, std=STD)
    assert res.mask.shape == (7, 10) and res.box == ncut(affinity(want[0]), (7, 10), 16, size).box
    seg = discover_image(bb, img, mean=MEAN, std=STD, dinoseg_head=4)
    assert rel_err(torch.from_numpy(seg.attention), reference_maps(ref, x)["attention"][4].double()) <= 1e-5


def test_tokencut_keys_carry_content_not_position(files) -> None:
    """A one-block RoPE model on a flat image: every patch enters the block with the same embedding, so the keys
    before the rotation are all equal (one cluster, a constant graph); after it they differ with position."""
    ref = random_dinov3(3, depth=1)
    path = save_release(ref, files["vits16-release"][1].parent / "one_block.pth")
    bb = load_model(path).backbone
    x = torch.zeros(1, 3, 64, 64)
    last = ins.last_block(bb, x)
    keys = torch.nn.functional.normalize(last.patch_keys()[0], dim=-1)
    rotated = torch.nn.functional.normalize(last.k[0, :, 5:].permute(1, 0, 2).reshape(16, -1), dim=-1)
    assert float((keys @ keys.T).min()) > 1 - 1e-5
    assert float((rotated @ rotated.T).min()) < 0.9


def test_a_learned_position_vit_without_registers_draws_no_register_panel() -> None:
    from ssl_distill.models import BackboneSpec, ViTBackbone

    torch.manual_seed(0)
    bb = ViTBackbone(BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2)).eval()
    maps = compute_maps(bb, photo("astronaut.png", (48, 40)), MEAN, STD)
    assert maps.reg_reads.shape == (0, 5, 6) and maps.cls_mass[:, 1].sum() == 0
    assert "registers" not in maps.caption() and maps.patch_norms.shape == (5, 6)
    last = ins.last_block(bb, torch.randn(1, 3, 40, 48))
    assert last.k_content is None and torch.equal(last.patch_keys(), last.k[:, :, 1:].permute(0, 2, 1, 3).reshape(1, 30, -1))


# ----------------------------------------------------------------------------------------------------
# End to end, from the command line
# ----------------------------------------------------------------------------------------------------
ROPE_RUN = ["model.pos_embed=rope", "model.reg_tokens=4", "model.layer_scale=1e-5", "ibot.weight=1",
            "masking.shape=block", "masking.pred_ratio=[0,0.3]", "masking.pred_ratio_var=[0,0.2]",
            "gram.weight=1", "gram.ema_teacher=true", "knn.image_size=32", "knn.resize_size=32"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssl_distill.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_a_dinov3_style_run_trains_resumes_and_is_evaluated_from_the_command_line(tmp_path: Path) -> None:
    """pos_embed rope, 4 registers, DINO + iBOT terms, Gram anchoring on (the live EMA teacher), online k-NN; 4
    steps straight vs 2 + a resume to 4: bit-identical; then knn, discover (TokenCut and DINO-seg) and
    visualize on the run."""
    train_dir, val_dir = make_folder(tmp_path / "train", 4, 0), make_folder(tmp_path / "val", 2, 1)
    knn = [f"knn.train_dir={train_dir}", f"knn.val_dir={val_dir}", "monitor.knn_every_steps=2",
           "knn.ks=[3]"]
    full, part = tmp_path / "full", tmp_path / "part"
    base = lambda out: tiny_overrides(train_dir, out) + ROPE_RUN + knn  # noqa: E731
    config = str(CONFIG)
    for out, stops in ((full, ["4"]), (part, ["2", "4"])):
        for stop in stops:
            done = cli("train", config, *base(out), f"run.stop_at_step={stop}")
            assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_file(full / "checkpoint.pth"), load_file(part / "checkpoint.pth")
    assert a["step"] == b["step"] == 4
    for net in ("student", "teacher"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert "backbone.vit.reg_token" in a["teacher"] and "backbone.vit.rope.periods" in a["teacher"]
    log = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r.get("kind") not in ("knn", "config_change") and "loss" in r]
    assert steps and all(math.isfinite(r["loss"]) and "gram" in r for r in steps)
    assert [r["step"] for r in log if r.get("kind") == "knn"] == [0, 2, 4]  # random init, every 2 steps

    done = cli("knn", str(part), "--train", str(train_dir), "--val", str(val_dir), "knn.ks=[3]")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "k-NN k=3" in done.stdout and json.loads((part / "knn.json").read_text())
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut.png", "chelsea.png", "coffee.png"):
        photo(name, (96, 64)).save(photos / name)
    for extra, out in (([], "boxes"), (["--dinoseg"], "boxes_dinoseg")):
        done = cli("discover", str(part), "--images", str(photos), "--out", str(tmp_path / out), "--heatmaps", *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        boxes = json.loads((tmp_path / out / "boxes.json").read_text())
        assert f"3 boxes -> {tmp_path / out / 'boxes.json'}" in done.stdout and len(boxes["annotations"]) == 3
        assert boxes["info"]["method"] == ("dinoseg" if extra else "tokencut")
    done = cli("visualize", str(part), str(photos), "--out", str(tmp_path / "figs"), "--rollout")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 figure(s)" in done.stdout
    data = np.load(tmp_path / "figs" / "chelsea" / "maps.npz")
    assert data["attention"].shape == (3, 8, 12) and data["reg_reads"].shape == (4, 8, 12)
    assert Image.open(tmp_path / "figs" / "chelsea" / "grid.png").height > 600
