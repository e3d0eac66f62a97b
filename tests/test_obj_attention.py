"""Who reads whom around ODIS's [OBJ] token, switch by switch (``odis.patches_read_obj``, ``odis.obj_reads_cls``):
in every block, on both backbones (learned positions, DINOv3's RoPE), with and without registers.

A block's output row i depends on its input row j (j != i) only through attention, so the rows j whose
gradient reaches output row i are exactly the keys query i reads: the test reads the pattern off the
blocks themselves, not off the mask that builds it. The authors' pattern (project page
cagatayyildiz.github.io/projects/odis: only the [OBJ] row is masked, [OBJ] attends to its object's patches)
is the default; ``patches_read_obj=false obj_reads_cls=true`` is our earlier reading (tests/test_obj_token.py).
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ssl_distill.config import Config, load_config
from ssl_distill.models import BackboneSpec, ObjAttention, build_backbone

SPECS = {
    "vit": BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2),
    "vit_registers": BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2, reg_tokens=2,
                                  no_embed_class=True),
    "rope": BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2, pos_embed="rope"),
    "rope_registers": BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2, pos_embed="rope",
                                   reg_tokens=2),
}
PATTERNS = [ObjAttention(p, c) for p in (True, False) for c in (True, False)]


def expected_reads(pattern: ObjAttention, n_reg: int, obj_mask: Tensor) -> Tensor:
    """bool (B, T, T): query i reads key j, written out by hand from the switches' definitions."""
    b, p = obj_mask.shape
    t = 2 + n_reg + p  # [CLS, OBJ, registers..., patches]
    reads = torch.ones(b, t, t, dtype=torch.bool)
    obj_row = torch.zeros(b, t, dtype=torch.bool)
    obj_row[:, 1] = True  # itself
    obj_row[:, 0] = pattern.obj_reads_cls
    obj_row[:, 2 + n_reg :] = obj_mask  # its object's patches, never a register
    reads[:, 1] = obj_row
    if not pattern.patches_read_obj:
        reads[:, [0, *range(2, t)], 1] = False  # [CLS], registers, patches
    return reads


def observed_reads(backbone, x: Tensor, obj_mask: Tensor) -> list[Tensor]:
    """Per block, bool (B, T, T): output row i of the block has a gradient from input row j."""
    calls: list[tuple[torch.nn.Module, Tensor, dict]] = []

    def pre(module, args, kwargs):
        calls.append((module, args[0].detach(), kwargs))

    handles = [blk.register_forward_pre_hook(pre, with_kwargs=True) for blk in backbone.vit.blocks]
    try:
        with torch.no_grad():
            backbone.forward_tokens(x, obj_mask=obj_mask)
    finally:
        for h in handles:
            h.remove()
    out = []
    for module, h, kwargs in calls:
        b, t, _ = h.shape
        inp = h.clone().requires_grad_(True)
        y = module(inp, **kwargs)
        picks = torch.eye(t).view(t, 1, t, 1).expand(t, b, t, y.shape[-1])  # cotangent i: output row i only
        (grads,) = torch.autograd.grad(y, inp, grad_outputs=picks, is_grads_batched=True)  # (T, B, T, D)
        out.append(grads.abs().sum(-1).permute(1, 0, 2) > 0)
    return out


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda a: f"patches_read_obj={a.patches_read_obj}-"
                                                           f"obj_reads_cls={a.obj_reads_cls}")
@pytest.mark.parametrize("name", list(SPECS))
def test_each_switch_gives_exactly_its_attention_pattern_in_every_block(name: str, pattern: ObjAttention) -> None:
    spec = SPECS[name]
    torch.manual_seed(0)
    backbone = build_backbone(spec, obj_token=True, obj_attention=pattern).eval()
    backbone.set_fused_attn(False)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    obj_mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(2)) < 0.4
    obj_mask[0] = False  # an empty object: [OBJ] reads itself (and [CLS] where allowed)
    obj_mask[-1] = True  # a whole-view object
    want = expected_reads(pattern, spec.reg_tokens, obj_mask)
    blocks = observed_reads(backbone, x, obj_mask)
    assert len(blocks) == spec.depth
    for k, got in enumerate(blocks):
        assert torch.equal(got, want), f"block {k}: {(got != want).nonzero()[:5].tolist()}"
    with torch.no_grad():  # the fused kernel takes the same mask
        plain = backbone.forward_tokens(x, obj_mask=obj_mask)
        backbone.set_fused_attn(True)
        fused = backbone.forward_tokens(x, obj_mask=obj_mask)
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-5, atol=1e-5)


def test_cls_and_patches_feel_the_obj_token_only_where_they_read_it() -> None:
    """With the authors' pattern the [OBJ] token and its mask move [CLS] and the patches (and forward() says
    so); with our earlier reading they do not."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    m = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) < 0.5
    for name in ("vit", "rope"):
        torch.manual_seed(0)
        bb = build_backbone(SPECS[name], obj_token=True).eval()
        assert bb.obj_attention == ObjAttention(patches_read_obj=True, obj_reads_cls=False)  # the default
        with torch.no_grad():
            a, b = bb.forward_tokens(x, obj_mask=m), bb.forward_tokens(x)
            assert (a["cls"] - b["cls"]).abs().max() > 1e-4 and (a["patch"] - b["patch"]).abs().max() > 1e-4
            torch.testing.assert_close(bb(x), b["cls"], rtol=1e-5, atol=1e-5)
            bb.obj_attention = ObjAttention(patches_read_obj=False, obj_reads_cls=True)
            a, b = bb.forward_tokens(x, obj_mask=m), bb.forward_tokens(x)
            assert torch.equal(a["cls"], b["cls"]) and torch.equal(a["patch"], b["patch"])


def test_the_cls_attention_monitor_includes_the_obj_key_where_cls_reads_it() -> None:
    """AttMask's last-block [CLS] -> patch attention is the softmax over the keys [CLS] reads: with [OBJ]
    read, the patch weights sum to less than 1 by [OBJ]'s share."""
    torch.manual_seed(0)
    bb = build_backbone(SPECS["vit"], obj_token=True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        read = bb.forward_tokens(x, cls_attention=True)["cls_attention"].sum(-1)
        bb.obj_attention = ObjAttention(patches_read_obj=False, obj_reads_cls=True)
        unread = bb.forward_tokens(x, cls_attention=True)["cls_attention"].sum(-1)
    assert torch.all(read < unread - 1e-4) and torch.all(unread < 1)  # [CLS] itself takes the rest


def test_the_config_chooses_the_pattern_and_old_checkpoints_keep_theirs() -> None:
    cfg = load_config(None, ["odis.weight=1", "data.boxes=b.json"])
    assert ObjAttention.from_config(cfg) == ObjAttention(patches_read_obj=True, obj_reads_cls=False)
    old = load_config(None, ["odis.weight=1", "data.boxes=b.json", "odis.patches_read_obj=false",
                             "odis.obj_reads_cls=true"])
    assert ObjAttention.from_config(old) == ObjAttention(patches_read_obj=False, obj_reads_cls=True)
    # a stored config written before the keys existed: the pattern its run trained with
    assert ObjAttention.from_config(cfg, {"weight": 1.0, "center_momentum": 0.9}) == ObjAttention(False, True)
    # a model no object term trained (an [OBJ] read-out for evaluation): nobody reads [OBJ]
    assert not ObjAttention.from_config(Config()).patches_read_obj
