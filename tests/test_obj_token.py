"""ODIS's [OBJ] token (Hızlı, Yıldız, Marttinen 2025): masked attention in both attention paths, checked
against an independent per-image reference, the [OBJ]-free model, checkpoints and the multi-crop wrapper.

These tests hold our earlier reading, ``odis.patches_read_obj=false odis.obj_reads_cls=true`` (:data:`EARLIER`):
no query reads [OBJ], so [CLS], registers and patches equal the model without [OBJ]. The authors' pattern
and every other switch setting are in tests/test_obj_attention.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_distill.checkpoints import FORMAT, CheckpointError, load_any_backbone
from ssl_distill.config import Config, ModelConfig, config_to_dict
from ssl_distill.models import BackboneSpec, DINOHead, MultiCropModel, ViTBackbone, fill_obj_from_cls
from ssl_distill.models.backbone import ObjAttention, random_init_like
from ssl_distill.models.inspect import BlockQKV, attention_weights, qkv_from_input

TINY = BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2)
TINY_REG = BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2, reg_tokens=2, no_embed_class=True)
PATHS = pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
EARLIER = ObjAttention(patches_read_obj=False, obj_reads_cls=True)  # the pattern before the switches


def odis_and_plain(spec: BackboneSpec = TINY, seed: int = 0, **kw) -> tuple[ViTBackbone, ViTBackbone]:
    """An [OBJ] backbone (attention pattern :data:`EARLIER`) with non-trivial weights, and the same weights
    without [OBJ]."""
    torch.manual_seed(seed)
    odis = ViTBackbone(spec, obj_token=True, **kw).eval()
    odis.obj_attention = EARLIER
    with torch.no_grad():  # random biases / norms so that no term is trivially zero or one
        for name, p in odis.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    plain = ViTBackbone(spec, **kw).eval()
    plain.load_state_dict({k: v for k, v in odis.state_dict().items() if not k.startswith("obj_")})
    return odis, plain


def random_obj_mask(b: int, p: int, seed: int = 0) -> Tensor:
    m = torch.rand(b, p, generator=torch.Generator().manual_seed(seed)) < 0.4
    m[0] = False  # an empty object
    m[-1] = True  # a whole-view object
    return m


def images(n: int = 3, size: int = 32, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------- an independent reference
def reference_obj(odis: ViTBackbone, plain: ViTBackbone, x: Tensor, obj_mask: Tensor) -> Tensor:
    """(B, D): the [OBJ] output computed image by image, each block attending from [OBJ] over the tokens it
    may see, sliced out explicitly: itself, [CLS] and the patches of its mask. CLS / register / patch tokens
    come from the [OBJ]-free model (they never read [OBJ])."""
    v = plain.vit
    assert isinstance(v.norm_pre, nn.Identity) and isinstance(v.blocks[0].ls1, nn.Identity)
    r = odis.num_reg_tokens
    out = []
    for i in range(x.shape[0]):
        h = v._pos_embed(v.patch_embed(x[i : i + 1]))  # (1, 1 + R + P, D) [CLS, registers, patches]
        seen = torch.cat([torch.zeros(1, dtype=torch.long), 1 + r + obj_mask[i].nonzero()[:, 0]])
        o = odis.obj_token + odis.obj_pos_embed  # (1, 1, D)
        for blk in v.blocks:
            a = blk.attn
            y = blk.norm1(torch.cat([o, h[:, seen]], dim=1))  # [OBJ] and the tokens it sees
            qkv = F.linear(y, a.qkv.weight, a.qkv.bias).view(1, y.shape[1], 3, a.num_heads, a.head_dim)
            q, k, val = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (1, heads, n, hd)
            w = ((q[:, :, :1] @ k.transpose(-2, -1)) / a.head_dim ** 0.5).softmax(dim=-1)
            o = o + F.linear((w @ val).transpose(1, 2).reshape(1, 1, -1), a.proj.weight, a.proj.bias)
            o = o + blk.mlp(blk.norm2(o))
            h = blk(h)
        out.append(v.norm(o)[:, 0])
    return torch.cat(out)


def captured_blocks(backbone: ViTBackbone, x: Tensor, **kw) -> tuple[dict[str, Tensor], list[dict]]:
    """forward_tokens(x, **kw) and, per block, its attention input, mask and output (hooks)."""
    records: list[dict] = []

    def pre(module, args, kwargs):
        records.append({"x": args[0], "mask": kwargs.get("attn_mask"), "module": module})

    def post(module, args, kwargs, output):
        records[-1]["out"] = output

    handles = []
    for blk in backbone.vit.blocks:
        handles.append(blk.attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(blk.attn.register_forward_hook(post, with_kwargs=True))
    try:
        out = backbone.forward_tokens(x, **kw)
    finally:
        for h in handles:
            h.remove()
    return out, records


# -------------------------------------------------------------- (a) all-True mask == no mask
@PATHS
def test_all_true_object_mask_equals_no_mask_exactly(fused: bool) -> None:
    odis, _ = odis_and_plain()
    odis.set_fused_attn(fused)
    x = images()
    with torch.no_grad():
        a = odis.forward_tokens(x)
        b = odis.forward_tokens(x, obj_mask=torch.ones(3, 16, dtype=torch.bool))
    assert set(a) == {"cls", "obj", "patch"}
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -------------------------------------------------------------- (b) zero weight on masked keys
@PATHS
@pytest.mark.parametrize("spec", [TINY, TINY_REG], ids=["plain_vit", "registers"])
def test_obj_attention_is_exactly_zero_on_masked_keys_at_every_block(fused: bool, spec: BackboneSpec) -> None:
    odis, _ = odis_and_plain(spec)
    odis.set_fused_attn(fused)
    x, m = images(), random_obj_mask(3, 16)
    r = spec.reg_tokens
    with torch.no_grad():
        _, records = captured_blocks(odis, x, obj_mask=m)
    assert len(records) == 2 and records[1]["mask"] is records[0]["mask"]  # one mask tensor per forward
    t = 2 + r + 16
    allowed = torch.zeros(3, t, dtype=torch.bool)  # keys the [OBJ] query may read
    allowed[:, :2] = True
    allowed[:, 2 + r :] = m
    for rec in records:
        q, k, v = qkv_from_input(rec["module"], rec["x"])
        qkv = BlockQKV(q, k, v, rec["module"].scale, odis.num_prefix_tokens, (4, 4), rec["mask"])
        # these are the weights the block used: its own output is recomputed from them
        torch.testing.assert_close(qkv.output(rec["module"]), rec["out"], rtol=1e-5, atol=1e-5)
        w = attention_weights(q, k, qkv.scale, rec["mask"])  # (B, heads, T, T)
        obj_row = w[:, :, 1]  # (B, heads, T)
        assert torch.all(obj_row[~allowed.unsqueeze(1).expand_as(obj_row)] == 0)
        assert torch.all(obj_row[allowed.unsqueeze(1).expand_as(obj_row)] > 0)
        others = torch.cat([w[:, :, :1, 1], w[:, :, 2:, 1]], dim=-1)  # every other query on the [OBJ] key
        assert torch.all(others == 0)
        assert torch.all(torch.cat([w[:, :, :1, 2:], w[:, :, 2:, 2:]], dim=2) > 0)  # the rest attends as usual


# -------------------------------------------------------------- (c) empty mask
@PATHS
def test_empty_object_mask_gives_finite_outputs(fused: bool) -> None:
    odis, plain = odis_and_plain()
    odis.set_fused_attn(fused)
    x, m = images(), torch.zeros(3, 16, dtype=torch.bool)
    out = odis.forward_tokens(x, obj_mask=m)
    assert all(torch.isfinite(t).all() for t in out.values())
    out["obj"].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in odis.parameters() if p.grad is not None)
    with torch.no_grad():  # [OBJ] read only itself and [CLS]
        torch.testing.assert_close(out["obj"], reference_obj(odis, plain, x, m), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------- (d) CLS / patches do not see [OBJ]
@PATHS
@pytest.mark.parametrize("spec", [TINY, TINY_REG], ids=["plain_vit", "registers"])
def test_cls_patch_and_registers_equal_the_model_without_obj(fused: bool, spec: BackboneSpec) -> None:
    odis, plain = odis_and_plain(spec, mask_token=True)
    for bb in (odis, plain):
        bb.set_fused_attn(fused)
    with torch.no_grad():
        odis.masked_embed.normal_()
        plain.masked_embed.copy_(odis.masked_embed)
    x, m = images(), random_obj_mask(3, 16)
    ibot = torch.rand(3, 16, generator=torch.Generator().manual_seed(5)) < 0.3
    with torch.no_grad():
        a = odis.forward_tokens(x, mask=ibot, cls_attention=True, obj_mask=m)
        b = plain.forward_tokens(x, mask=ibot, cls_attention=True)
        assert set(a) == set(b) | {"obj"}
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(odis(x), plain(x), rtol=0, atol=0)  # forward(): [OBJ] left out
        torch.testing.assert_close(odis(x), odis.forward_tokens(x, obj_mask=m)["cls"], rtol=1e-5, atol=1e-5)
        # intermediate layers: [CLS, OBJ, registers..., patches]; CLS / patch as without [OBJ]
        lo, lp = odis.forward_last_blocks(x, 2, obj_mask=m), plain.forward_last_blocks(x, 2)
        torch.testing.assert_close(lo["cls"], lp["cls"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lo["patch"], lp["patch"], rtol=1e-5, atol=1e-5)
        assert lo["obj"].shape == (3, 2, 192)
        torch.testing.assert_close(lo["obj"][:, -1], odis.forward_tokens(x, obj_mask=m)["obj"], rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------- (e) the per-image reference
@PATHS
@pytest.mark.parametrize("spec", [TINY, TINY_REG], ids=["plain_vit", "registers"])
def test_obj_output_equals_the_per_image_reference(fused: bool, spec: BackboneSpec) -> None:
    odis, plain = odis_and_plain(spec, seed=3)
    odis.set_fused_attn(fused)
    for size, seed in ((32, 0), (48, 1)):  # the stored grid, and an interpolated one
        p = (size // 8) ** 2
        x, m = images(4, size, seed), random_obj_mask(4, p, seed)
        with torch.no_grad():
            ours = odis.forward_tokens(x, obj_mask=m)["obj"]
            ref = reference_obj(odis, plain, x, m)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        # and the mask matters: the whole view gives another [OBJ]
        assert (ours[1:3] - odis.forward_tokens(x)["obj"][1:3].detach()).abs().max() > 1e-3


# -------------------------------------------------------------- (f) the two attention paths
def test_fused_and_plain_paths_agree() -> None:
    odis, _ = odis_and_plain(TINY_REG, mask_token=True)
    x, m = images(), random_obj_mask(3, 16)
    ibot = torch.rand(3, 16, generator=torch.Generator().manual_seed(2)) < 0.3
    outs = []
    for fused in (True, False):
        odis.set_fused_attn(fused)
        with torch.no_grad():
            outs.append(odis.forward_tokens(x, mask=ibot, cls_attention=True, obj_mask=m))
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-5)


@PATHS
def test_bf16_autocast_builds_the_mask_in_the_attention_dtype(fused: bool) -> None:
    odis, _ = odis_and_plain()
    odis.set_fused_attn(fused)
    x, m = images(), random_obj_mask(3, 16)
    with torch.no_grad():
        ref = odis.forward_tokens(x, obj_mask=m)["obj"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, records = captured_blocks(odis, x, obj_mask=m)
            low = odis.forward_tokens(x, obj_mask=m)["obj"]
    assert records[0]["mask"].dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


def test_bad_object_masks_are_refused() -> None:
    odis, plain = odis_and_plain()
    x = images()
    with pytest.raises(ValueError, match="shape"):
        odis.forward_tokens(x, obj_mask=torch.ones(3, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        odis.forward_tokens(x, obj_mask=torch.ones(3, 16))
    with pytest.raises(ValueError, match="obj_token=True"):
        plain.forward_tokens(x, obj_mask=torch.ones(3, 16, dtype=torch.bool))


# -------------------------------------------------------------- (g) checkpoints
def dino_release(seed: int = 0) -> dict[str, Tensor]:
    """A DINO-style bare backbone state dict (official names = timm's here), random values."""
    torch.manual_seed(seed)
    sd = ViTBackbone(TINY).vit.state_dict()
    return {k: v + 0.1 * torch.randn_like(v) for k, v in sd.items()}


def test_dino_release_loads_into_an_odis_backbone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sd = dino_release()
    torch.save(sd, tmp_path / "dino.pth")
    plain = load_any_backbone(tmp_path / "dino.pth").backbone
    assert not plain.has_obj_token and "note" not in capsys.readouterr().out
    loaded = load_any_backbone(tmp_path / "dino.pth", obj_token=True)
    assert "[OBJ]" in capsys.readouterr().out
    bb = loaded.backbone
    assert bb.has_obj_token and bb.num_prefix_tokens == 2
    assert torch.equal(bb.obj_token, sd["cls_token"]) and torch.equal(bb.obj_pos_embed, sd["pos_embed"][:, :1])
    assert not bb.obj_token.requires_grad  # frozen like the rest
    x = images(2, 64)
    with torch.no_grad():
        out = bb.forward_tokens(x)
        torch.testing.assert_close(out["cls"], plain.forward_tokens(x)["cls"], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(out["obj"]).all()
    bad = dict(sd, extra=torch.zeros(1))
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="extra"):  # strict for everything else
        load_any_backbone(tmp_path / "bad.pth", obj_token=True)


def test_registers_model_gets_a_zero_position_term() -> None:
    state = {"vit.cls_token": torch.randn(1, 1, 4), "vit.pos_embed": torch.randn(1, 9, 4)}
    assert fill_obj_from_cls(state, no_embed_class=True)
    assert torch.equal(state["obj_token"], state["vit.cls_token"]) and not state["obj_pos_embed"].any()
    assert not fill_obj_from_cls(state, no_embed_class=True)  # already there: left alone
    with pytest.raises(ValueError, match="obj_pos_embed"):
        fill_obj_from_cls({"vit.cls_token": torch.zeros(1, 1, 4), "obj_token": torch.zeros(1, 1, 4)}, False)


def _own_checkpoint(path: Path, backbone: ViTBackbone) -> None:
    cfg = Config(model=ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, depth=2))
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state["head.w"] = torch.zeros(2)
    torch.save({"format": FORMAT, "config": config_to_dict(cfg), "teacher": state, "student": state}, path)


def test_own_checkpoints_with_and_without_obj(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    odis, plain = odis_and_plain(mask_token=True)
    _own_checkpoint(tmp_path / "dino.pth", plain)
    loaded = load_any_backbone(tmp_path / "dino.pth", obj_token=True)
    assert "[OBJ]" in capsys.readouterr().out
    assert torch.equal(loaded.backbone.obj_token, plain.vit.cls_token)
    assert torch.equal(loaded.backbone.obj_pos_embed, plain.vit.pos_embed[:, :1])
    assert loaded.dropped == ["masked_embed"] and loaded.ignored == 1
    _own_checkpoint(tmp_path / "odis.pth", odis)  # an ODIS run keeps its own [OBJ] token, no note
    for flag in (False, True):
        bb = load_any_backbone(tmp_path / "odis.pth", obj_token=flag).backbone
        assert bb.has_obj_token and torch.equal(bb.obj_token, odis.obj_token)
        assert torch.equal(bb.obj_pos_embed, odis.obj_pos_embed)
    assert "note" not in capsys.readouterr().out


def test_random_init_like_keeps_obj_and_draws_the_plain_weights(tmp_path: Path) -> None:
    """Every --random-init evaluation (k-NN, object k-NN, discover) rebuilds an ODIS model with its [OBJ]
    token, and its ViT weights are those of the [OBJ]-free model from the same seed (so the random-init
    rows of plain and ODIS runs are the same model)."""
    odis, _ = odis_and_plain()
    fresh = random_init_like(odis, seed=3)
    torch.manual_seed(3)
    plain = ViTBackbone(TINY).state_dict()
    state = fresh.state_dict()
    assert fresh.has_obj_token and not fresh.training
    assert not any(p.requires_grad for p in fresh.parameters())
    assert set(state) - set(plain) == {"obj_token", "obj_pos_embed"}
    assert all(torch.equal(state[k], plain[k]) for k in plain)
    assert not torch.equal(fresh.obj_token, odis.obj_token)
    _own_checkpoint(tmp_path / "odis.pth", odis)
    from ssl_distill.eval.model import load_model

    rebuilt, _ = load_model(tmp_path / "odis.pth", random_init=True, seed=3)
    assert rebuilt.has_obj_token and torch.equal(rebuilt.obj_token, fresh.obj_token)


# -------------------------------------------------------------- (h) multi-crop
def crops_and_masks(b: int = 2) -> tuple[list[Tensor], list[Tensor]]:
    crops = [images(b, 32, 0), images(b, 32, 1), images(b, 16, 2), images(b, 16, 3)]
    masks = [random_obj_mask(b, 16, 4), random_obj_mask(b, 16, 5), random_obj_mask(b, 4, 6),
             torch.tensor([[True, False, False, True], [False, True, False, False]])]
    return crops, masks


@pytest.mark.parametrize("use_bn", [False, True], ids=["head", "bn_head"])
def test_multicrop_returns_obj_rows_crop_major(use_bn: bool) -> None:
    odis, _ = odis_and_plain()
    torch.manual_seed(1)
    head = DINOHead(192, 50, hidden_dim=32, bottleneck_dim=16, use_bn=use_bn)
    model = MultiCropModel(odis, head).train()  # BatchNorm on batch statistics
    crops, masks = crops_and_masks()
    with torch.no_grad():
        out = model(crops, obj_masks=masks)
        assert out["obj"].shape == (8, 50) and out["obj_feat"].shape == (8, 192) and out["cls"].shape == (8, 50)
        for v, (c, m) in enumerate(zip(crops, masks, strict=True)):
            torch.testing.assert_close(out["obj_feat"][2 * v : 2 * v + 2], odis.forward_tokens(c, obj_mask=m)["obj"],
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out["cls_feat"][2 * v : 2 * v + 2], odis(c), rtol=1e-5, atol=1e-5)
        if use_bn:  # CLS logits exactly as without [OBJ]: the head saw the CLS rows alone
            cls_only = head(out["cls_feat"])
            assert torch.equal(out["cls"], cls_only)
            assert torch.equal(out["obj"], head(out["obj_feat"]))
        else:
            torch.testing.assert_close(out["cls"], head(out["cls_feat"]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out["obj"], head(out["obj_feat"]), rtol=1e-5, atol=1e-5)
        plain_run = model(crops)
        assert "obj" not in plain_run
        torch.testing.assert_close(plain_run["cls_feat"], out["cls_feat"], rtol=1e-5, atol=1e-5)
        # with iBOT's mask token and the teacher's patch targets on the first group
        model.backbone.masked_embed = nn.Parameter(torch.randn(1, 192))
        ibot = torch.rand(4, 16, generator=torch.Generator().manual_seed(9)) < 0.3
        both = model(crops, masks=ibot, patches="masked", cls_attention=True, obj_masks=masks)
        assert both["obj"].shape == (8, 50) and both["cls_attention"].shape == (4, 16)
        assert both["patch_masked"].shape == (int(ibot.sum()), 50)
        torch.testing.assert_close(both["obj_feat"][4:], out["obj_feat"][4:], rtol=1e-5, atol=1e-5)  # locals
    with pytest.raises(ValueError, match="one mask per crop"):
        model(crops, obj_masks=masks[:3])
    with pytest.raises(ValueError, match="obj_token=True"):
        MultiCropModel(ViTBackbone(TINY), head)(crops, obj_masks=masks)


# -------------------------------------------------------------- (i) gradients
def test_gradients_reach_the_obj_parameters_and_cls_ignores_them() -> None:
    odis, _ = odis_and_plain()
    model = MultiCropModel(odis, DINOHead(192, 50, hidden_dim=32, bottleneck_dim=16)).train()
    crops, masks = crops_and_masks()
    out = model(crops, obj_masks=masks)
    out["cls"].square().sum().backward(retain_graph=True)
    for p in (odis.obj_token, odis.obj_pos_embed):  # the CLS term does not depend on [OBJ]
        assert p.grad is None or torch.all(p.grad == 0)
    odis.zero_grad()
    out["obj"].square().sum().backward()
    for p in (odis.obj_token, odis.obj_pos_embed):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    torch.testing.assert_close(odis.obj_token.grad, odis.obj_pos_embed.grad)  # both enter as their sum
