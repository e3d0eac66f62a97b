"""Official DINO / iBOT / DINOv2 checkpoint layouts, built locally, loaded and checked against a reference.

Each test writes a state dict in an official layout (random weights, small widths) and compares the
features of the loaded backbone with ``reference_forward``: a functional ViT written from the
architecture descriptions (DINO / DINOv2 papers and code), reading the file's own key names. DINOv2
layouts are also cross-checked against timm's own converter (``checkpoint_filter_fn``).
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_distill.checkpoints import CheckpointError, load_any_backbone, load_backbone, read_checkpoint
from ssl_distill.eval.export import export_backbone

WIDTH, HEADS = 192, 3  # a standard width (vit_tiny): the head count is inferred from it


# ----------------------------------------------------------------------------------------------------
# Official layouts
# ----------------------------------------------------------------------------------------------------
def official_vit(seed: int, depth: int = 2, patch: int = 16, grid: int = 4, width: int = WIDTH,
                 layer_scale: str | None = None, registers: int = 0, swiglu: bool = False,
                 mask_token: str | None = None) -> dict[str, Tensor]:
    """A ViT state dict in DINO / iBOT / DINOv2 names (flat blocks), random non-trivial values.

    layer_scale: None, "ls" (DINOv2 ``ls1.gamma``) or "gamma" (iBOT ``gamma_1``).
    """
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.05: torch.randn(*shape, generator=g) * s  # noqa: E731
    sd = {
        "cls_token": r(1, 1, width, s=0.5),
        "pos_embed": r(1, 1 + grid * grid, width, s=0.5),
        "patch_embed.proj.weight": r(width, 3, patch, patch, s=0.02),
        "patch_embed.proj.bias": r(width),
    }
    if registers:
        sd["register_tokens"] = r(1, registers, width, s=0.5)
    if mask_token == "dinov2":
        sd["mask_token"] = r(1, width)
    elif mask_token == "ibot":
        sd["masked_embed"] = r(1, width)
    hidden = (int(4 * width * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * width
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width),
            b + "attn.qkv.weight": r(3 * width, width), b + "attn.qkv.bias": r(3 * width),
            b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width),
            b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width),
        })
        if swiglu:
            sd.update({b + "mlp.w12.weight": r(2 * hidden, width), b + "mlp.w12.bias": r(2 * hidden),
                       b + "mlp.w3.weight": r(width, hidden), b + "mlp.w3.bias": r(width)})
        else:
            sd.update({b + "mlp.fc1.weight": r(hidden, width), b + "mlp.fc1.bias": r(hidden),
                       b + "mlp.fc2.weight": r(width, hidden), b + "mlp.fc2.bias": r(width)})
        if layer_scale == "ls":
            sd.update({b + "ls1.gamma": 0.5 + r(width, s=0.3), b + "ls2.gamma": 0.5 + r(width, s=0.3)})
        elif layer_scale == "gamma":
            sd.update({b + "gamma_1": 0.5 + r(width, s=0.3), b + "gamma_2": 0.5 + r(width, s=0.3)})
    sd["norm.weight"], sd["norm.bias"] = 1 + r(width), r(width)
    return sd


def chunk_blocks(sd: dict[str, Tensor], chunks: int) -> dict[str, Tensor]:
    """DINOv2's FSDP block chunks: blocks.<chunk>.<global index>.*"""
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    size = depth // chunks
    out = {}
    for k, v in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        out[f"blocks.{int(m.group(1)) // size}.{m.group(1)}.{m.group(2)}" if m else k] = v
    return out


def dino_head(prefix: str, seed: int, ibot: bool = False) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    head = {f"{prefix}mlp.0.weight": torch.randn(32, WIDTH, generator=g), f"{prefix}mlp.0.bias": torch.zeros(32),
            f"{prefix}last_layer.weight_g": torch.ones(64, 1), f"{prefix}last_layer.weight_v": torch.randn(64, 32)}
    if ibot:
        head.update({f"{prefix}last_layer2.weight_g": torch.ones(64, 1),
                     f"{prefix}last_layer2.weight_v": torch.randn(64, 32)})
    return head


def prefixed(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------
# Reference: the official forward pass, straight from the official key names
# ----------------------------------------------------------------------------------------------------
def reference_forward(sd: dict[str, Tensor], x: Tensor, num_heads: int, offset: float = 0.1,
                      antialias: bool = False) -> Tensor:
    """Normalized tokens [CLS, registers..., patches] of a DINO / iBOT / DINOv2 ViT (any block layout).

    Position embeddings at other grid sizes follow DINO's ``interpolate_pos_encoding`` (``offset=0.1``,
    no antialiasing) or DINOv2-with-registers' (``offset=0``: target size, antialiased).
    """
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)  # noqa: E731
    w = sd["patch_embed.proj.weight"]
    p = w.shape[-1]
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=p)
    b, d, gh, gw = t.shape
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t.flatten(2).transpose(1, 2)], dim=1)
    pos = sd["pos_embed"]
    m = int(math.sqrt(pos.shape[1] - 1))
    if (gh, gw) != (m, m):
        grid = pos[:, 1:].reshape(1, m, m, d).permute(0, 3, 1, 2)
        if offset:
            grid = F.interpolate(grid, scale_factor=((gh + offset) / m, (gw + offset) / m), mode="bicubic")
        else:
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=antialias)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)], dim=1)
    t = t + pos
    if "register_tokens" in sd:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]], dim=1)
    blocks: dict[int, str] = {}
    for k in sd:
        if m2 := re.match(r"(blocks\.(?:\d+\.)?(\d+))\.norm1\.weight$", k):
            blocks[int(m2.group(2))] = m2.group(1)
    for i in range(len(blocks)):
        pre = blocks[i]
        h = ln(t, pre + ".norm1")
        qkv = F.linear(h, sd[pre + ".attn.qkv.weight"], sd.get(pre + ".attn.qkv.bias"))
        q, k, v = qkv.reshape(b, -1, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (d // num_heads) ** -0.5).softmax(-1)
        h = F.linear((attn @ v).transpose(1, 2).reshape(b, -1, d), sd[pre + ".attn.proj.weight"],
                     sd[pre + ".attn.proj.bias"])
        g1 = sd.get(pre + ".ls1.gamma", sd.get(pre + ".gamma_1"))
        t = t + (h * g1 if g1 is not None else h)
        h = ln(t, pre + ".norm2")
        if pre + ".mlp.w12.weight" in sd:
            x1, x2 = F.linear(h, sd[pre + ".mlp.w12.weight"], sd[pre + ".mlp.w12.bias"]).chunk(2, dim=-1)
            h = F.linear(F.silu(x1) * x2, sd[pre + ".mlp.w3.weight"], sd[pre + ".mlp.w3.bias"])
        else:
            h = F.linear(F.gelu(F.linear(h, sd[pre + ".mlp.fc1.weight"], sd[pre + ".mlp.fc1.bias"])),
                         sd[pre + ".mlp.fc2.weight"], sd[pre + ".mlp.fc2.bias"])
        g2 = sd.get(pre + ".ls2.gamma", sd.get(pre + ".gamma_2"))
        t = t + (h * g2 if g2 is not None else h)
    return ln(t, "norm")


def images(size: int, n: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_matches_timm(loaded, sd: dict[str, torch.Tensor], name: str, size: int, **kwargs) -> None:
    """timm's own DINOv2 model ``name``, filled by timm's converter from ``sd``, gives our features."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref = timm.create_model(name, pretrained=False, img_size=size, embed_dim=WIDTH, depth=2, num_heads=HEADS,
                            num_classes=0, **kwargs).eval()
    ref.load_state_dict(checkpoint_filter_fn(dict(sd), ref))
    x = images(size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone.vit.forward_features(x), ref.forward_features(x),
                                   rtol=1e-5, atol=1e-5)


def check_features(loaded, sd: dict[str, Tensor], size: int, n_reg: int = 0, **ref_kw) -> None:
    x = images(size)
    with torch.no_grad():
        ref = reference_forward(sd, x, HEADS, **ref_kw)
        ours = loaded.backbone.forward_tokens(x)
    torch.testing.assert_close(ours["cls"], ref[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours["patch"], ref[:, 1 + n_reg:], rtol=1e-4, atol=1e-4)
    if n_reg:
        torch.testing.assert_close(ours["reg"], ref[:, 1:1 + n_reg], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# DINO
# ----------------------------------------------------------------------------------------------------
def test_dino_backbone_release(tmp_path: Path) -> None:
    sd = official_vit(0, depth=2, patch=16, grid=4)  # 64 px native
    torch.save(sd, tmp_path / "dino_deitsmall16_pretrain.pth")
    loaded = load_any_backbone(tmp_path / "dino_deitsmall16_pretrain.pth")
    spec = loaded.spec
    assert (loaded.format, loaded.source) == ("dino", "(whole file)")
    assert (spec.embed_dim, spec.depth, spec.num_heads, spec.patch_size, spec.img_size) == (WIDTH, 2, HEADS, 16, 64)
    assert spec.pos_interp == "dino" and spec.layer_scale is None and spec.reg_tokens == 0
    check_features(loaded, sd, 64)  # stored size
    check_features(loaded, sd, 96)  # interpolated as DINO does (+0.1 offset, no antialias)
    check_features(loaded, sd, 48)
    # the config describes the inferred model and rebuilds it
    backbone, cfg = load_backbone(tmp_path / "dino_deitsmall16_pretrain.pth")
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.patch_size, cfg.model.pos_interp) == (WIDTH, 2, 16, "dino")


def test_dino_full_checkpoint_teacher_and_student(tmp_path: Path) -> None:
    teacher, student = official_vit(1), official_vit(2)
    ckpt = {
        "teacher": {**prefixed(teacher, "backbone."), **dino_head("head.", 3)},
        "student": {**prefixed(student, "module.backbone."), **dino_head("module.head.", 4)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=65536, lr=0.0005,
                                   data_path=Path("/datasets/imagenet/train"), output_dir="/out"),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    t = load_any_backbone(tmp_path / "checkpoint.pth")
    assert (t.format, t.source, t.prefix, t.ignored) == ("dino", "teacher", "backbone.", 4)
    check_features(t, teacher, 64)
    s = load_any_backbone(tmp_path / "checkpoint.pth", which="student")
    assert (s.source, s.prefix) == ("student", "module.backbone.")
    check_features(s, student, 64)
    k = load_any_backbone(tmp_path / "checkpoint.pth", key="student")
    check_features(k, student, 64)
    # a run directory holding it works too (the file name our runs use)
    check_features(load_any_backbone(tmp_path), teacher, 64)


def test_head_count_from_args_for_non_standard_width(tmp_path: Path) -> None:
    sd = official_vit(5, width=128)
    torch.save({"teacher": prefixed(sd, "backbone."), "args": argparse.Namespace(arch="custom")}, tmp_path / "a.pth")
    assert load_any_backbone(tmp_path / "a.pth").spec.num_heads == 2  # 64-wide heads
    loaded = load_any_backbone(tmp_path / "a.pth", num_heads=4)
    assert loaded.spec.num_heads == 4
    x = images(64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(x), reference_forward(sd, x, 4)[:, 0], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# iBOT
# ----------------------------------------------------------------------------------------------------
def test_ibot_state_dict_release_and_full_checkpoint(tmp_path: Path) -> None:
    sd = official_vit(6, mask_token="ibot")
    torch.save({"state_dict": sd}, tmp_path / "checkpoint_teacher.pth")
    rel = load_any_backbone(tmp_path / "checkpoint_teacher.pth")
    assert (rel.format, rel.source, rel.dropped) == ("ibot", "state_dict", ["masked_embed"])
    assert rel.spec.pos_interp == "dino"
    check_features(rel, sd, 64)
    check_features(rel, sd, 80)

    student = official_vit(7, mask_token="ibot")
    full = {"teacher": {**prefixed(sd, "backbone."), **dino_head("head.", 8, ibot=True)},
            "student": {**prefixed(student, "module.backbone."), **dino_head("module.head.", 9, ibot=True)},
            "args": argparse.Namespace(arch="vit_tiny", patch_size=16, pred_ratio=[0.0, 0.3]), "epoch": 3}
    torch.save(full, tmp_path / "ibot_full.pth")
    t = load_any_backbone(tmp_path / "ibot_full.pth")
    assert (t.format, t.dropped, t.ignored) == ("ibot", ["masked_embed"], 6)  # head incl. last_layer2 ignored
    check_features(t, sd, 64)
    check_features(load_any_backbone(tmp_path / "ibot_full.pth", which="student"), student, 64)


def test_ibot_layer_scale_gamma_names(tmp_path: Path) -> None:
    sd = official_vit(10, layer_scale="gamma", mask_token="ibot")
    torch.save({"state_dict": sd}, tmp_path / "ibot_ls.pth")
    loaded = load_any_backbone(tmp_path / "ibot_ls.pth")
    assert loaded.spec.layer_scale is not None
    check_features(loaded, sd, 64)


# ----------------------------------------------------------------------------------------------------
# DINOv2
# ----------------------------------------------------------------------------------------------------
def test_dinov2_release_518px_layer_scale_mask_token(tmp_path: Path) -> None:
    sd = official_vit(11, depth=2, patch=14, grid=37, layer_scale="ls", mask_token="dinov2")  # pos_embed for 518 px
    torch.save(sd, tmp_path / "dinov2_vits14_pretrain.pth")
    loaded = load_any_backbone(tmp_path / "dinov2_vits14_pretrain.pth")
    spec = loaded.spec
    assert (loaded.format, loaded.dropped) == ("dinov2", ["mask_token"])
    assert (spec.patch_size, spec.img_size, spec.layer_scale is not None, spec.pos_interp) == (14, 518, True, "dino")
    check_features(loaded, sd, 224)  # the usual evaluation size: interpolated as DINOv2 does
    check_features(loaded, sd, 112)


def test_dinov2_registers(tmp_path: Path) -> None:
    sd = official_vit(12, depth=2, patch=14, grid=8, layer_scale="ls", registers=4, mask_token="dinov2")
    torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    loaded = load_any_backbone(tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    spec = loaded.spec
    assert (spec.reg_tokens, spec.no_embed_class, spec.img_size, spec.pos_interp) == (4, True, 112, "timm")
    assert loaded.backbone.num_prefix_tokens == 5
    check_features(loaded, sd, 112, n_reg=4)
    # the _reg4 models interpolate to the target size with antialiasing (interpolate_offset=0)
    check_features(loaded, sd, 70, n_reg=4, offset=0.0, antialias=True)
    check_features(loaded, sd, 168, n_reg=4, offset=0.0, antialias=True)
    # timm's own DINOv2 converter gives the same features at the stored size
    assert_matches_timm(loaded, sd, "vit_small_patch14_reg4_dinov2", 112)


def test_dinov2_chunked_training_outputs(tmp_path: Path) -> None:
    teacher = official_vit(13, depth=4, patch=14, grid=4, layer_scale="ls", mask_token="dinov2")
    student = official_vit(14, depth=4, patch=14, grid=4, layer_scale="ls", mask_token="dinov2")
    head = {"dino_head.mlp.0.weight": torch.randn(8, WIDTH), "ibot_head.mlp.0.weight": torch.randn(8, WIDTH)}
    torch.save({"teacher": {**prefixed(chunk_blocks(teacher, 2), "backbone."), **head}},
               tmp_path / "teacher_checkpoint.pth")
    assert "backbone.blocks.1.3.mlp.fc2.bias" in torch.load(tmp_path / "teacher_checkpoint.pth")["teacher"]
    t = load_any_backbone(tmp_path / "teacher_checkpoint.pth")
    assert (t.format, t.spec.depth, t.ignored) == ("dinov2", 4, 2)
    check_features(t, chunk_blocks(teacher, 2), 56)
    check_features(t, teacher, 84)
    model = {**prefixed(chunk_blocks(teacher, 4), "teacher.backbone."),
             **prefixed(chunk_blocks(student, 4), "student.backbone."), **prefixed(head, "teacher.")}
    torch.save({"model": model, "iteration": 1250}, tmp_path / "model_0001249.pth")
    check_features(load_any_backbone(tmp_path / "model_0001249.pth"), teacher, 56)
    check_features(load_any_backbone(tmp_path / "model_0001249.pth", which="student"), student, 56)


def test_dinov2_giant_swiglu(tmp_path: Path) -> None:
    sd = official_vit(15, depth=2, patch=14, grid=4, layer_scale="ls", swiglu=True, mask_token="dinov2")
    torch.save(sd, tmp_path / "dinov2_vitg14_like.pth")
    loaded = load_any_backbone(tmp_path / "dinov2_vitg14_like.pth")
    hidden = (int(4 * WIDTH * 2 / 3) + 7) // 8 * 8
    assert loaded.spec.mlp_layer == "swiglu" and loaded.spec.mlp_hidden() == 2 * hidden
    check_features(loaded, sd, 56)
    check_features(loaded, sd, 28)
    assert_matches_timm(loaded, sd, "vit_giant_patch14_dinov2", 56, mlp_ratio=2 * hidden / WIDTH + 1e-4)


def test_intermediate_layers_match_reference(tmp_path: Path) -> None:
    sd = official_vit(16, depth=3, patch=14, grid=4, layer_scale="ls", registers=4)
    torch.save(sd, tmp_path / "reg.pth")
    bb = load_any_backbone(tmp_path / "reg.pth").backbone
    x = images(56)
    with torch.no_grad():
        outs = bb.get_intermediate_layers(x, n=2)
        for depth, out in zip((2, 3), outs):
            cut = {k: v for k, v in sd.items() if not re.match(rf"blocks\.([{depth}-9])\.", k)}
            torch.testing.assert_close(out, reference_forward(cut, x, HEADS), rtol=1e-4, atol=1e-4)
        last = bb.forward_last_blocks(x, 2)
        assert last["cls"].shape == (2, 2, WIDTH) and last["patch"].shape == (2, 16, WIDTH)  # registers excluded


# ----------------------------------------------------------------------------------------------------
# Wrong files
# ----------------------------------------------------------------------------------------------------
def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path: Path) -> None:
    sd = official_vit(17, layer_scale="ls", mask_token="dinov2", patch=14)
    broken = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    broken["blocks.0.attn.rel_pos_bias"] = torch.zeros(3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks\.1\.mlp\.fc2\.bias'\].*"
                                              r"unexpected keys \['blocks\.0\.attn\.rel_pos_bias'\]"):
        load_any_backbone(tmp_path / "broken.pth")
    chunked = chunk_blocks(sd, 2)
    chunked["blocks.1.1.ls2.gamma"] = torch.ones(7)
    torch.save(chunked, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.1\.ls2\.gamma: checkpoint \(7,\) vs model \(192,\)"):
        load_any_backbone(tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="does not divide the width"):
        torch.save(sd, tmp_path / "ok.pth")
        load_any_backbone(tmp_path / "ok.pth", num_heads=5)


def test_not_a_vit_and_wrong_entries(tmp_path: Path) -> None:
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)},
               tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="ResNet"):
        load_any_backbone(tmp_path / "resnet.pth")
    torch.save({"teacher": prefixed(official_vit(18), "backbone.")}, tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match=r"no entry 'ema'.*\['teacher'\]"):
        load_any_backbone(tmp_path / "t.pth", key="ema")
    with pytest.raises(CheckpointError, match="no student"):
        load_any_backbone(tmp_path / "t.pth", which="student")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk.pth is not a PyTorch checkpoint: it starts with b'not ', neither a zip archive nor a pickle$"):
        load_any_backbone(tmp_path / "junk.pth")  # one sentence, not torch's paragraphs
    (tmp_path / "text.pth").write_bytes(b"junk\n")
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint: it starts with b'junk'"):
        load_any_backbone(tmp_path / "text.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "t.pth").read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=r"truncated or damaged"):
        load_any_backbone(tmp_path / "cut.pth")


class Payload:
    """Any class outside the allow-list (stands for a pickle that runs code when loaded)."""

    def __reduce__(self):  # noqa: ANN204
        return (os.getcwd, ())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickles_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": official_vit(19), "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*: it needs posix\.getcwd"):
        load_any_backbone(tmp_path / "evil.pth")
    with open(tmp_path / "evil_plain.pkl", "wb") as f:  # legacy (non-zip) pickle
        pickle.dump({"x": Payload()}, f)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*: it needs posix\.getcwd"):
        read_checkpoint(tmp_path / "evil_plain.pkl")
    import numpy as np

    torch.save({"args": argparse.Namespace(p=Path("/x"), lr=np.float64(0.1)), "n": np.int64(3)}, tmp_path / "ok.pth")
    obj, _ = read_checkpoint(tmp_path / "ok.pth")
    assert obj["args"].p == Path("/x") and obj["n"] == 3


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["dino", "dinov2_reg", "dinov2_giant"])
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_export_loads_in_timm_and_back(tmp_path: Path, layout: str, fmt: str) -> None:
    if layout == "dino":
        sd, size = official_vit(20), 64
    elif layout == "dinov2_reg":
        sd, size = official_vit(21, patch=14, grid=4, layer_scale="ls", registers=4, mask_token="dinov2"), 56
    else:
        sd, size = official_vit(22, patch=14, grid=4, layer_scale="ls", swiglu=True, mask_token="dinov2"), 56
    torch.save({"teacher": prefixed(sd, "backbone.")}, tmp_path / "ckpt.pth")
    out = tmp_path / f"backbone.{fmt}"
    info = export_backbone(tmp_path / "ckpt.pth", out)
    assert info["format"] == fmt and Path(info["sidecar"]).is_file()
    model = timm.create_model(info["timm_model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              **info["timm_kwargs"]).eval()
    ours = load_any_backbone(tmp_path / "ckpt.pth").backbone
    again = load_any_backbone(out)
    assert again.spec == ours.spec or fmt == "pth"
    x = images(size)
    with torch.no_grad():
        ref = ours.vit.forward_features(x)
        torch.testing.assert_close(model.forward_features(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again.backbone.vit.forward_features(x), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Our own checkpoints still load (teacher by default, student on request), old configs included
# ----------------------------------------------------------------------------------------------------
def test_own_checkpoint_teacher_and_student(tmp_path: Path) -> None:
    from ssl_distill.checkpoints import FORMAT, atomic_save
    from ssl_distill.config import config_to_dict, load_config
    from ssl_distill.engine.train import build_model

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "dino_tiny_fmnist.yaml", ["model.depth=2", "model.out_dim=16",
                                                                    "model.hidden_dim=16", "model.bottleneck_dim=8"])
    torch.manual_seed(0)
    teacher, student = build_model(cfg, 0.0).eval(), build_model(cfg, 0.0).eval()
    old_style = config_to_dict(cfg)
    for k in ("mlp_ratio", "mlp_layer", "qkv_bias", "layer_scale", "reg_tokens", "no_embed_class", "pos_interp"):
        del old_style["model"][k]  # a checkpoint written before these fields existed
    atomic_save({"format": FORMAT, "teacher": teacher.state_dict(), "student": student.state_dict(),
                 "config": old_style}, tmp_path / "run" / "checkpoint.pth")
    x = images(28)
    for which, model in (("teacher", teacher), ("student", student)):
        loaded = load_any_backbone(tmp_path / "run", which=which)
        assert (loaded.format, loaded.source) == ("ssl-distill", which) and loaded.spec.pos_interp == "timm"
        with torch.no_grad():
            torch.testing.assert_close(loaded.backbone(x), model.backbone(x))
    with torch.no_grad():
        torch.testing.assert_close(load_any_backbone(tmp_path / "run", key="student").backbone(x), student.backbone(x))
        bb, cfg2 = load_backbone(tmp_path / "run")
        torch.testing.assert_close(bb(x), teacher.backbone(x))
    assert cfg2.model.depth == 2 and cfg2.knn.image_size == 28
    with pytest.raises(CheckpointError, match="key must be"):
        load_any_backbone(tmp_path / "run", key="model")


def test_export_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ssl_distill.eval import export

    sd = official_vit(23, patch=14, grid=4, layer_scale="ls", mask_token="dinov2")
    torch.save({"teacher": prefixed(chunk_blocks(sd, 2), "backbone.")}, tmp_path / "teacher_checkpoint.pth")
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "teacher_checkpoint.pth"), str(tmp_path / "out" / "vits14.safetensors")])
    assert export.run(args) == 0
    printed = capsys.readouterr().out
    assert "timm.create_model('vit_tiny_patch14_dinov2'" not in printed  # no such timm name: falls back
    assert "pretrained_cfg_overlay=dict(file=" in printed
    loaded = load_any_backbone(tmp_path / "out" / "vits14.safetensors")
    assert loaded.spec.pos_interp == "dino" and loaded.spec.layer_scale is not None  # the spec travels along
    check_features(loaded, sd, 28)
