"""Attention on demand (ssl_distill.models.inspect) and the attention figures (eval/visualize)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from scenes import SKIMAGE_DATA, tiny_checkpoint
from ssl_distill.eval.drawing import threshold_mass
from ssl_distill.eval.visualize import compute_maps, main, pca_rgb
from ssl_distill.models import BackboneSpec, ViTBackbone
from ssl_distill.models import inspect as ins

TINY = BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=3)


def dinov2_style() -> ViTBackbone:
    """Our wrapper around a timm ViT with layer scale, QK-norm and 4 register tokens."""
    bb = ViTBackbone(TINY)
    bb.vit = VisionTransformer(img_size=32, patch_size=8, num_classes=0, embed_dim=64, depth=2, num_heads=4,
                               qkv_bias=True, init_values=0.5, qk_norm=True, reg_tokens=4, dynamic_img_size=True)
    bb.num_prefix_tokens = bb.vit.num_prefix_tokens
    bb.embed_dim = 64
    return bb.eval()


@pytest.mark.parametrize("model", ["ours", "dinov2_style"])
@pytest.mark.parametrize("fused", [True, False])
def test_explicit_attention_agrees_with_the_model_forward(model, fused):
    torch.manual_seed(0)
    bb = ViTBackbone(TINY).eval() if model == "ours" else dinov2_style()
    bb.set_fused_attn(fused)
    x = torch.randn(2, 3, 40, 24)  # a non-square size: 5 x 3 patches
    outputs = {}
    watch = bb.vit.blocks[-1].attn.register_forward_hook(lambda m, a, o: outputs.__setitem__("attn", o))
    seen = ins.inspect_forward(bb, x)
    watch.remove()
    with torch.no_grad():
        # the explicit weights, through v and the projection, give exactly what the (fused) block computed
        torch.testing.assert_close(seen.last.output(bb.vit.blocks[-1].attn), outputs["attn"], rtol=1e-4, atol=1e-5)
        ref = bb.forward_tokens(x)
    torch.testing.assert_close(seen.tokens["patch"], ref["patch"])
    torch.testing.assert_close(ins.patch_tokens(bb, x), ref["patch"].reshape(2, 5, 3, -1))
    # stopping the forward early gives the same keys; prefix tokens (CLS, registers) are dropped
    keys = ins.last_block_keys(bb, x)
    heads, n_tok = seen.last.num_heads, seen.last.q.shape[2]
    assert n_tok == bb.num_prefix_tokens + 15 and keys.shape == (2, 15, bb.embed_dim)
    torch.testing.assert_close(keys, seen.last.k[:, :, bb.num_prefix_tokens:].permute(0, 2, 1, 3).reshape(2, 15, -1))
    attn = seen.last.attention()
    assert attn.shape == (2, heads, n_tok, n_tok)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, heads, n_tok))
    # nothing stays attached, the model is unchanged
    for blk in bb.vit.blocks:
        assert not blk.attn._forward_pre_hooks and not blk.attn._forward_hooks and blk.attn.fused_attn == fused


def test_cls_maps_sum_to_one_and_match_the_full_attention_row():
    torch.manual_seed(0)
    bb = ViTBackbone(TINY).eval()
    x = torch.randn(1, 3, 32, 48)
    maps = ins.cls_attention_maps(bb, x)
    assert maps.shape == (1, 3, 4, 6)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(1, 3))
    row = ins.last_block(bb, x).attention()[0, :, 0, 1:]
    torch.testing.assert_close(maps[0].reshape(3, -1), row / row.sum(-1, keepdim=True))


def test_rollout_matches_the_product_of_all_blocks():
    torch.manual_seed(0)
    bb = ViTBackbone(TINY).eval()
    x = torch.randn(1, 3, 24, 32)
    maps = ins.all_attentions(bb, x)
    assert len(maps) == 3
    n = maps[0].shape[-1]
    r = torch.eye(n)
    for a in maps:
        a = 0.5 * a.mean(1)[0] + 0.5 * torch.eye(n)
        r = (a / a.sum(-1, keepdim=True)) @ r
    expected = r[0, 1:] / r[0, 1:].sum()
    got = ins.attention_rollout(bb, x)
    assert got.shape == (1, 3, 4)
    torch.testing.assert_close(got[0].reshape(-1), expected)
    torch.testing.assert_close(ins.inspect_forward(bb, x, rollout=True).rollout, got)


def test_threshold_keeps_the_stated_mass():
    m = np.array([[0.5, 0.3], [0.1, 0.1]])
    assert threshold_mass(m, 0.6).tolist() == [[True, True], [False, False]]
    assert threshold_mass(m, 0.5).tolist() == [[True, False], [False, False]]  # exactly 0.5 is enough
    assert threshold_mass(m, 1.0).all()
    rng = np.random.default_rng(0)
    maps = rng.dirichlet(np.full(35, 0.3), size=6).reshape(6, 5, 7)
    for frac in (0.3, 0.6, 0.9):
        keep = threshold_mass(maps, frac)
        for a, k in zip(maps, keep):
            kept = a[k].sum()
            assert kept >= frac - 1e-12  # holds the mass ...
            assert kept - a[k].min() < frac  # ... and is the smallest such set (drop the weakest: too little)
            assert a[k].min() >= a[~k].max()  # the strongest patches
    with pytest.raises(ValueError):
        threshold_mass(m, 0.0)


def test_pca_recovers_the_main_directions():
    rng = np.random.default_rng(0)
    h, w = 6, 8
    coords = rng.standard_normal((h * w, 3)) * np.array([10.0, 5.0, 2.0])
    basis = np.linalg.qr(rng.standard_normal((16, 3)))[0].T  # 3 orthonormal directions in 16-D
    feats = (coords @ basis + 0.01 * rng.standard_normal((h * w, 16))).reshape(h, w, 16)
    rgb = pca_rgb(feats)
    assert rgb.shape == (h, w, 3) and rgb.min() >= 0 and rgb.max() <= 1
    for j in range(3):  # channel j follows coordinate j (up to sign and scaling)
        assert abs(np.corrcoef(rgb[..., j].ravel(), coords[:, j])[0, 1]) > 0.95


def test_compute_maps_any_size_and_threshold():
    torch.manual_seed(0)
    bb = ViTBackbone(TINY).eval()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8))
    maps = compute_maps(bb, img, (0.5,) * 3, (0.25,) * 3, threshold=0.6, rollout=True)
    assert maps.image.shape == (40, 64, 3)  # cropped to whole patches
    assert maps.attention.shape == (3, 5, 8) and maps.masks.shape == (3, 5, 8)
    np.testing.assert_allclose(maps.attention.sum(axis=(1, 2)), 1.0, rtol=1e-5)  # before thresholding
    for a, k in zip(maps.attention, maps.masks):
        assert a[k].sum() >= 0.6 - 1e-6 and a[k].sum() - a[k].min() < 0.6
    assert maps.pca.shape == (5, 8, 3) and maps.rollout.shape == (5, 8)
    assert maps.upsample(maps.masks[0]).shape == (40, 64)


def test_command_line_writes_the_figure_for_a_real_photo(tmp_path, capsys):
    ck = tiny_checkpoint(tmp_path / "run" / "checkpoint.pth")
    chelsea = SKIMAGE_DATA / "chelsea.png"  # 451 x 300
    assert main([str(ck), str(chelsea), "--rollout"]) == 0
    out = tmp_path / "run" / "attention" / "chelsea"
    assert str(out / "grid.png") in capsys.readouterr().out
    grid = Image.open(out / "grid.png")
    assert grid.mode in ("RGB", "RGBA") and grid.width > 800 and grid.height > 400
    assert np.asarray(grid.convert("L")).std() > 20  # a picture, not a blank canvas
    for i in range(3):  # vit_tiny: 3 heads, one PNG each: heat map over the image | mask overlay
        head = Image.open(out / f"head_{i}.png")
        assert head.size == (2 * 448 + 4, 296)
    assert Image.open(out / "pca.png").size == (448, 296) and (out / "rollout.png").is_file()
    data = np.load(out / "maps.npz")
    assert data["attention"].shape == (3, 37, 56) and data["masks"].dtype == bool

    # batch mode over a folder (nested), random weights, no threshold
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.open(chelsea).resize((120, 80)).save(folder / "cat.png")
    Image.open(SKIMAGE_DATA / "coffee.png").resize((96, 64)).save(folder / "sub" / "coffee.jpg")
    assert main([str(tmp_path / "run"), str(folder), "--out", str(tmp_path / "figs"), "--random-init",
                 "--threshold", "0", "--no-pca"]) == 0
    assert (tmp_path / "figs" / "cat" / "grid.png").is_file() and (tmp_path / "figs" / "sub" / "coffee" / "grid.png").is_file()
    assert not (tmp_path / "figs" / "cat" / "pca.png").exists()
    with pytest.raises(SystemExit):
        main([str(ck), str(tmp_path / "nope.png")])
    assert "nope.png" in capsys.readouterr().err


def test_a_folder_with_an_image_smaller_than_a_patch_names_it_and_draws_the_rest(tmp_path, capsys):
    ck = tiny_checkpoint(tmp_path / "run" / "checkpoint.pth")
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(folder / "a_dot.png")  # sorted first: used to stop the run
    Image.open(SKIMAGE_DATA / "coffee.png").resize((48, 32)).save(folder / "coffee.png")
    assert main([str(ck), str(folder), "--out", str(tmp_path / "figs")]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipping {folder / 'a_dot.png'}: image 1x1 is smaller than one" in captured.err
    assert "1 figure(s)" in captured.out and (tmp_path / "figs" / "coffee" / "grid.png").is_file()
    with pytest.raises(SystemExit) as stop:  # nothing left to draw: an error naming the file, not a traceback
        main([str(ck), str(folder / "a_dot.png"), "--out", str(tmp_path / "figs")])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert f"error: no image to draw: {folder / 'a_dot.png'} (image 1x1 is smaller than one" in err
    assert "Traceback" not in err


def test_a_folder_of_unreadable_files_is_an_error_and_writes_nothing(tmp_path, capsys):
    ck = tiny_checkpoint(tmp_path / "run" / "checkpoint.pth")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG but cut short")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as stop:
        main([str(ck), str(folder), "--out", str(tmp_path / "figs")])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert f"error: none of the 2 image(s) could be read (the first: {folder / 'a.png'}:" in err
    assert "Traceback" not in err and not (tmp_path / "figs").exists()
