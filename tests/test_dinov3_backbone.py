"""DINOv3's RoPE ViT as a backbone, and official DINOv3 files: features against the reference model
(tests/dinov3_reference.py, the official architecture at random weights, saved in the released layout and in the
``teacher_checkpoint.pth`` layout), refusals, export to timm's DINOv3 model, the mask token and the [OBJ] token.

Relative errors are normwise: max |ours - reference| / max |reference| over each compared tensor. The ViT-S/16 and
S+/16 models have their width, heads, MLP, registers and RoPE, but 4 of their 12 blocks (CPU time; every block is
the same code).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file as load_safetensors
from torch import Tensor

from dinov3_reference import DinoV3ViT, random_dinov3
from ssl_distill.checkpoints import CheckpointError, load_any_backbone
from ssl_distill.config import ConfigError, load_config
from ssl_distill.eval.export import export_backbone
from ssl_distill.models import BackboneSpec, ObjAttention, RopeViTBackbone, build_backbone
from ssl_distill.models import inspect as ins
from ssl_distill.models.backbone import random_init_like

SIZES = [(224, 224), (240, 320)]
# ViT-S/16 and S+/16 (SwiGLU, official ffn_ratio 6), 4 blocks
MODELS = {"vits16": dict(depth=4), "vits16plus": dict(depth=4, ffn_ratio=6.0, swiglu=True)}


def rel_err(ours: Tensor, ref: Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def images(h: int, w: int, n: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def save_release(model: DinoV3ViT, path: Path, periods_dtype: torch.dtype = torch.float32) -> Path:
    """The released layout: a bare state dict (periods stored in ``periods_dtype``)."""
    sd = model.state_dict()
    sd["rope_embed.periods"] = sd["rope_embed.periods"].to(periods_dtype)
    torch.save(sd, path)
    return path


def save_teacher_checkpoint(model: DinoV3ViT, path: Path) -> Path:
    """The official training output: {"teacher": backbone.*, dino_head.*, ibot_head.*} (heads without weight norm)."""
    g = torch.Generator().manual_seed(7)
    teacher = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    for head in ("dino_head", "ibot_head"):
        teacher.update({f"{head}.mlp.0.weight": torch.randn(32, 384, generator=g),
                        f"{head}.mlp.0.bias": torch.zeros(32), f"{head}.mlp.2.weight": torch.randn(16, 32, generator=g),
                        f"{head}.mlp.2.bias": torch.zeros(16),
                        f"{head}.last_layer.weight": torch.randn(64, 16, generator=g)})
    torch.save({"teacher": teacher}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[DinoV3ViT, Path]]:
    """The reference models and their files: each size released (S with bf16-rounded periods, stored in bf16,
    as timm says the releases hold them) and as a training output."""
    root = tmp_path_factory.mktemp("dinov3")
    out = {}
    for i, (name, kw) in enumerate(MODELS.items()):
        bf16 = name == "vits16"
        model = random_dinov3(10 + i, bf16_periods=bf16, **kw)
        out[f"{name}-release"] = model, save_release(model, root / f"dinov3_{name}_pretrain.pth",
                                                     torch.bfloat16 if bf16 else torch.float32)
        out[f"{name}-teacher"] = model, save_teacher_checkpoint(model, root / f"{name}_teacher_checkpoint.pth")
    return out


# ----------------------------------------------------------------------------------------------------
# Features equal the official model's
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["release", "teacher"])
@pytest.mark.parametrize("name", list(MODELS))
def test_official_files_give_the_official_features(files, name: str, layout: str) -> None:
    ref, path = files[f"{name}-{layout}"]
    loaded = load_any_backbone(path)
    bb = loaded.backbone
    assert isinstance(bb, RopeViTBackbone) and loaded.format == "dinov3"
    assert (loaded.source, loaded.prefix) == (("(whole file)", "") if layout == "release" else ("teacher", "backbone."))
    assert loaded.ignored == (0 if layout == "release" else 10)  # the two heads
    assert loaded.dropped == ["mask_token", "blocks.*.attn.qkv.bias_mask", "blocks.*.attn.qkv.bias (K third)"]
    assert torch.equal(loaded.mask_token, ref.mask_token)
    spec = loaded.spec
    swiglu = name == "vits16plus"
    assert (spec.pos_embed, spec.embed_dim, spec.depth, spec.num_heads, spec.reg_tokens) == ("rope", 384, 4, 6, 4)
    assert (spec.mlp_layer, spec.mlp_ratio) == (("swiglu", 8.0) if swiglu else ("mlp", 4.0))
    assert spec.qkv_bias and spec.layer_scale is not None and spec.rope_theta == 100.0
    # the file's periods, bf16-rounded ones included, not the formula's
    assert torch.equal(bb.vit.rope.periods, ref.rope_embed.periods) and bb.vit.rope.periods.dtype == torch.float32
    for h, w in SIZES:
        x = images(h, w)
        with torch.no_grad():
            official = ref.forward_features(x)
            tokens = bb.forward_tokens(x, cls_attention=True)
            last4, ref4 = bb.get_intermediate_layers(x, n=4), ref.get_intermediate_layers(x, n=4)
            blocks = bb.forward_last_blocks(x, n=4)
            cls = bb(x)
            attn = ref.last_cls_attention(x)
        assert tokens["patch"].shape == (2, (h // 16) * (w // 16), 384)
        assert rel_err(tokens["cls"], official["x_norm_clstoken"]) <= 1e-5
        assert rel_err(cls, official["x_norm_clstoken"]) <= 1e-5
        assert rel_err(tokens["reg"], official["x_storage_tokens"]) <= 1e-5
        assert rel_err(tokens["patch"], official["x_norm_patchtokens"]) <= 1e-5
        for ours, theirs in zip(last4, ref4):
            assert rel_err(ours, theirs) <= 1e-5
        assert rel_err(blocks["cls"], torch.stack([o[:, 0] for o in ref4], 1)) <= 1e-5
        assert rel_err(blocks["patch"], ref4[-1][:, 5:]) <= 1e-5  # registers never in the patch outputs
        assert rel_err(tokens["cls_attention"], attn) <= 1e-5


def test_timm_names_and_training_only_keys(tmp_path: Path) -> None:
    """timm's own DINOv3 model state dict loads (periods computed: the formula) and gives timm's features; a
    file with ``local_cls_norm`` (SAT ViT-L, 7B) drops it."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, depth=2, num_classes=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    loaded = load_any_backbone(tmp_path / "timm.pth")
    assert loaded.format == "timm" and loaded.spec.num_heads == 6 and loaded.spec.pos_embed == "rope"
    x = images(64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone.forward_tokens(x)["patch"], model.forward_features(x)[:, 5:],
                                   rtol=1e-5, atol=1e-5)
    ref = random_dinov3(3, depth=2, local_cls_norm=True)
    loaded = load_any_backbone(save_release(ref, tmp_path / "sat.pth"))
    assert "local_cls_norm.weight" in loaded.dropped and "local_cls_norm.bias" in loaded.dropped
    with torch.no_grad():
        assert rel_err(loaded.backbone(x), ref.forward_features(x)["x_norm_clstoken"]) <= 1e-5


# ----------------------------------------------------------------------------------------------------
# Files that do not fit are refused by name
# ----------------------------------------------------------------------------------------------------
def test_foreign_truncated_and_mismatched_files_are_refused_by_name(tmp_path: Path) -> None:
    ref = random_dinov3(4, depth=2)
    good = save_release(ref, tmp_path / "good.pth")
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_any_backbone(tmp_path / "truncated.pth")
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3)},
               tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="ResNet"):
        load_any_backbone(tmp_path / "resnet.pth")
    sd = ref.state_dict()
    without = lambda *keys: {k: v for k, v in sd.items() if not k.endswith(keys)}  # noqa: E731
    cases = {
        "missing": (without("blocks.1.ls2.gamma"), r"missing keys \['blocks\.1\.gamma_2'\]"),
        "unexpected": (dict(sd, **{"cls_norm.weight": torch.ones(384)}), r"unexpected keys \['cls_norm\.weight'\]"),
        "shape": (dict(sd, storage_tokens=torch.zeros(1, 4, 383)), r"storage_tokens: checkpoint \(1, 4, 383\)"),
        "mask": (dict(sd, **{"blocks.0.attn.qkv.bias_mask": torch.ones(1152)}), r"bias_mask is not DINOv3's K mask"),
        "k_bias": (without("bias_mask"), r"blocks\.0\.attn\.qkv\.bias has a non-zero K third"),
    }
    for case, (state, match) in cases.items():
        torch.save(state, tmp_path / f"{case}.pth")
        with pytest.raises(CheckpointError, match=match):
            load_any_backbone(tmp_path / f"{case}.pth")
    # without bias_mask but with a zero K third (a mask_k_bias=false run whose K bias stayed 0): the same model
    state = {k: v.clone() for k, v in sd.items() if not k.endswith("bias_mask")}
    for k in state:
        if k.endswith("qkv.bias"):
            state[k][384:768] = 0
    torch.save(state, tmp_path / "no_mask.pth")
    x = images(32, 48)
    with torch.no_grad():
        torch.testing.assert_close(load_any_backbone(tmp_path / "no_mask.pth").backbone(x),
                                   load_any_backbone(good).backbone(x))


# ----------------------------------------------------------------------------------------------------
# Export to timm's DINOv3 model
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("name", list(MODELS))
def test_export_loads_strictly_in_timms_dinov3_model(files, tmp_path: Path, name: str, fmt: str) -> None:
    ref, path = files[f"{name}-teacher"]
    ours = load_any_backbone(path).backbone
    info = export_backbone(path, tmp_path / f"out.{fmt}")
    expected = "vit_small_plus_patch16_dinov3_qkvb" if name == "vits16plus" else "vit_small_patch16_dinov3_qkvb"
    assert info["timm_model"] == expected and json.loads(Path(info["sidecar"]).read_text())["rope_periods"]
    model = timm.create_model(info["timm_model"], pretrained=False, **info["timm_kwargs"]).eval()
    exported = torch.load(tmp_path / f"out.{fmt}") if fmt == "pth" else load_safetensors(tmp_path / f"out.{fmt}")
    model.load_state_dict(exported, strict=True)
    x = images(96, 128)
    with torch.no_grad():
        theirs = model.forward_features(x)
        mine = ours.forward_tokens(x)
    # S+'s periods are the formula's: equal features; S's bf16-rounded ones: copy them in as the sidecar says
    if name == "vits16plus":
        assert "match exactly" in info["note"] and rel_err(theirs[:, 5:], mine["patch"]) <= 1e-5
    else:
        assert "copy them" in info["note"] and rel_err(theirs[:, 5:], mine["patch"]) > 1e-5
        model.rope.periods.copy_(torch.tensor(info["rope_periods"]))
        with torch.no_grad():
            theirs = model.forward_features(x)
    assert rel_err(theirs[:, 0], mine["cls"]) <= 1e-5 and rel_err(theirs[:, 1:5], mine["reg"]) <= 1e-5
    assert rel_err(theirs[:, 5:], mine["patch"]) <= 1e-5
    # and back into ssl-distill: safetensors carries the exact spec and periods; .pth the formula periods
    again = load_any_backbone(tmp_path / f"out.{fmt}").backbone
    assert again.spec.pos_embed == "rope" and again.spec.num_heads == 6
    assert torch.equal(again.vit.rope.periods, ours.vit.rope.periods) == (fmt == "safetensors" or name == "vits16plus")


# ----------------------------------------------------------------------------------------------------
# Mask token, [OBJ] token, attention inspection: as on ViTBackbone
# ----------------------------------------------------------------------------------------------------
def loaded_with(path: Path, **kw) -> RopeViTBackbone:
    """The file's backbone built with extra tokens (mask token from the file, [OBJ] from its [CLS]); an [OBJ]
    token gets our earlier attention pattern, no query reading it (the authors' is in test_obj_attention.py)."""
    plain = load_any_backbone(path)
    if kw.get("obj_token"):
        kw["obj_attention"] = ObjAttention(patches_read_obj=False, obj_reads_cls=True)
    bb = build_backbone(plain.spec, init_weights=False, **kw)
    state = plain.backbone.state_dict()
    if kw.get("mask_token"):
        state["masked_embed"] = plain.mask_token
    if kw.get("obj_token"):
        bb.fill_obj(state)
        state["obj_token"] = state["obj_token"] + 0.3 * torch.randn(state["obj_token"].shape,
                                                                    generator=torch.Generator().manual_seed(1))
    bb.load_state_dict(state)
    return bb.eval()


def test_mask_token_replaces_masked_patch_embeddings_as_officially(tmp_path: Path) -> None:
    ref = random_dinov3(5, depth=3)
    bb = loaded_with(save_release(ref, tmp_path / "f.pth"), mask_token=True)
    x = images(64, 80)
    masks = torch.rand(2, 20, generator=torch.Generator().manual_seed(2)) < 0.4
    with torch.no_grad():
        official = ref.forward_features(x, masks)
        ours = bb.forward_tokens(x, mask=masks)
        plain = bb.forward_tokens(x)
    assert rel_err(ours["patch"], official["x_norm_patchtokens"]) <= 1e-5
    assert rel_err(ours["cls"], official["x_norm_clstoken"]) <= 1e-5
    assert (ours["cls"] - plain["cls"]).abs().max() > 1e-3  # the mask matters
    with pytest.raises(ValueError, match="mask_token=True"):
        load_any_backbone(tmp_path / "f.pth").backbone.forward_tokens(x, mask=masks)


def reference_obj(ref: DinoV3ViT, obj: Tensor, x: Tensor, obj_mask: Tensor) -> Tensor:
    """(B, D): the [OBJ] output image by image, its query reading itself, [CLS] and its object's patches (keys
    rotated at their positions; [OBJ], a prefix token, unrotated), sliced out explicitly."""
    out = []
    for i in range(x.shape[0]):
        t, (h, w) = ref.prepare(x[i : i + 1])
        seen = torch.cat([torch.zeros(1, dtype=torch.long), 1 + ref.storage + obj_mask[i].nonzero()[:, 0]])
        o = obj
        for blk in ref.blocks:
            rope = ref.rope_embed(h, w)
            q_o, k_o, v_o = (z.view(1, ref.heads, 1, -1) for z in blk.attn.qkv(blk.norm1(o)).chunk(3, dim=-1))
            _, k, v = blk.attn.qkv_heads(blk.norm1(t), rope)
            keys, values = torch.cat([k_o, k[:, :, seen]], dim=2), torch.cat([v_o, v[:, :, seen]], dim=2)
            a = (q_o @ keys.transpose(-2, -1) * q_o.shape[-1] ** -0.5).softmax(-1) @ values
            o = o + blk.ls1(blk.attn.proj(a.transpose(1, 2).reshape(1, 1, -1)))
            o = o + blk.ls2(blk.mlp(blk.norm2(o)))
            t = blk(t, rope)
        out.append(ref.norm(o)[:, 0])
    return torch.cat(out)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_obj_token_reads_its_object_and_nobody_reads_it(tmp_path: Path, fused: bool) -> None:
    ref = random_dinov3(6, depth=3)
    path = save_release(ref, tmp_path / "f.pth")
    odis, plain = loaded_with(path, obj_token=True, mask_token=True), loaded_with(path, mask_token=True)
    assert odis.num_prefix_tokens == 6 and all(b.attn.num_prefix_tokens == 6 for b in odis.vit.blocks)
    for bb in (odis, plain):
        bb.set_fused_attn(fused)
    x = images(64, 80, n=3)
    m = torch.rand(3, 20, generator=torch.Generator().manual_seed(3)) < 0.4
    m[0], m[-1] = False, True  # an empty object, a whole-view one
    ibot = torch.rand(3, 20, generator=torch.Generator().manual_seed(4)) < 0.3
    with torch.no_grad():
        a = odis.forward_tokens(x, mask=ibot, cls_attention=True, obj_mask=m)
        b = plain.forward_tokens(x, mask=ibot, cls_attention=True)
        assert set(a) == set(b) | {"obj"}
        for k in b:  # CLS, registers, patches and CLS attention as without [OBJ]
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(odis(x), plain(x), rtol=1e-5, atol=1e-5)
        every = odis.forward_tokens(x, obj_mask=torch.ones(3, 20, dtype=torch.bool))
        for k, v in odis.forward_tokens(x).items():
            assert torch.equal(v, every[k]), k
        ours = odis.forward_tokens(x, obj_mask=m)["obj"]
        assert rel_err(ours, reference_obj(ref, odis.obj_token, x, m)) <= 1e-5
        lo, lp = odis.forward_last_blocks(x, 2, obj_mask=m), plain.forward_last_blocks(x, 2)
        torch.testing.assert_close(lo["patch"], lp["patch"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lo["obj"][:, -1], ours, rtol=1e-5, atol=1e-5)
    # a file without [OBJ] gives one initialised from its [CLS]
    loaded = load_any_backbone(path, obj_token=True).backbone
    assert torch.equal(loaded.obj_token, ref.cls_token)


def test_explicit_attention_agrees_with_the_rope_models_forward(tmp_path: Path) -> None:
    """models.inspect on a RoPE model: the recomputed weights (rotated queries and keys) give exactly what
    the block computed; the CLS row is forward_tokens' cls_attention."""
    ref = random_dinov3(8, depth=2)
    bb = load_any_backbone(save_release(ref, tmp_path / "f.pth")).backbone
    bb.set_fused_attn(True)
    x = images(48, 64)
    outputs = {}
    watch = bb.vit.blocks[-1].attn.register_forward_hook(lambda m, a, o: outputs.__setitem__("attn", o))
    seen = ins.inspect_forward(bb, x, rollout=True)
    watch.remove()
    with torch.no_grad():
        torch.testing.assert_close(seen.last.output(bb.vit.blocks[-1].attn), outputs["attn"], rtol=1e-4, atol=1e-5)
        cls_row = seen.last.attention()[:, :, 0, 5:].mean(1)
        torch.testing.assert_close(cls_row, bb.forward_tokens(x, cls_attention=True)["cls_attention"])
    assert ins.last_block_keys(bb, x).shape == (2, 12, 384) and seen.rollout.shape == (2, 3, 4)
    torch.testing.assert_close(ins.cls_attention_maps(bb, x).sum((-2, -1)), torch.ones(2, 6))


# ----------------------------------------------------------------------------------------------------
# Building: official initialisation, drop path, the student's coordinate augmentation
# ----------------------------------------------------------------------------------------------------
def test_fresh_backbone_follows_the_official_initialisation() -> None:
    spec = BackboneSpec(arch="vit_small", depth=4, pos_embed="rope", reg_tokens=4, layer_scale=1e-5,
                        drop_path_rate=0.2, rope_rescale_coords=2.0)
    torch.manual_seed(0)
    bb = build_backbone(spec, mask_token=True)
    v = bb.vit
    formula = 100.0 ** (2 * torch.arange(16, dtype=torch.float32) / 32)
    assert torch.equal(v.rope.periods, formula) and "vit.rope.periods" in bb.state_dict()
    assert all(torch.all(b.gamma_1 == 1e-5) and torch.all(b.gamma_2 == 1e-5) for b in v.blocks)
    assert all(b.drop_path1.drop_prob == b.drop_path2.drop_prob == 0.2 for b in v.blocks)  # uniform, as DINOv3
    for w in (v.blocks[0].attn.proj.weight, v.blocks[-1].attn.proj.weight, v.blocks[-1].mlp.fc2.weight):
        assert 0.015 < float(w.detach().std()) < 0.025  # trunc normal 0.02, no depth rescaling
    assert not v.blocks[0].attn.q_bias.any() and not bb.masked_embed.any() and not v.blocks[0].attn.k_bias.any()
    bound = (1 / (3 * 16 * 16)) ** 0.5
    assert float(v.patch_embed.proj.weight.detach().abs().max()) <= bound
    assert 0.015 < float(v.reg_token.detach().std()) < 0.025
    # the coordinate augmentation: one draw per block while training, none in eval
    x = images(32, 48)
    bb.train()
    draws = bb._block_kwargs((2, 3), 4, torch.float32)
    assert not torch.equal(draws[0]["rope"], draws[1]["rope"])
    bb.eval()
    with torch.no_grad():
        assert torch.equal(bb(x), bb(x))
    teacher = build_backbone(BackboneSpec(**{**spec.__dict__, "rope_rescale_coords": None})).train()
    kw = teacher._block_kwargs((2, 3), 4, torch.float32)
    assert all(k["rope"] is kw[0]["rope"] for k in kw)
    again = random_init_like(bb, 0)
    assert isinstance(again, RopeViTBackbone) and not again.training


@pytest.mark.parametrize("overrides, expect", [
    (["model.pos_embed=rotary"], "model.pos_embed must be learned"),
    (["model.pos_embed=rope", "model.pos_interp=dino"], "learned position embedding"),
    (["model.pos_embed=rope", "model.rope_rescale_coords=0.5"], "rope_rescale_coords=0.5 is out of range"),
    (["model.rope_theta=10000"], "applies to model.pos_embed=rope only"),
    (["model.norm_eps=1e-5"], "applies to model.pos_embed=rope only"),
])
def test_rope_keys_are_checked(overrides: list[str], expect: str) -> None:
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match=expect):
        load_config(root / "configs" / "dino_tiny_fmnist.yaml", overrides)


def test_head_width_must_suit_axial_rope() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        build_backbone(BackboneSpec(arch="vit_tiny", depth=1, embed_dim=60, num_heads=6, pos_embed="rope"))


def test_bf16_autocast_rotates_in_bf16_close_to_fp32() -> None:
    """In mixed precision the RoPE embedding comes in the autocast dtype (as DINOv3's training default); the
    tokens stay close to the fp32 ones, masks, [OBJ] and CLS attention included."""
    torch.manual_seed(0)
    bb = build_backbone(BackboneSpec(arch="vit_small", depth=2, pos_embed="rope", reg_tokens=4, layer_scale=0.5),
                        mask_token=True, obj_token=True).eval()
    x, m = images(32, 48), torch.rand(2, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    assert bb._block_kwargs((2, 3), 1, torch.bfloat16)[0]["rope"].dtype == torch.bfloat16
    with torch.no_grad():
        ref = bb.forward_tokens(x, mask=m, cls_attention=True, obj_mask=m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = bb.forward_tokens(x, mask=m, cls_attention=True, obj_mask=m)
    for k in ref:
        assert rel_err(low[k].float(), ref[k]) < 0.05, k
