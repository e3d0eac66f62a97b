"""DINOv3's RoPE ViT as a backbone: the official initialisation, drop path, the student's RoPE coordinate
augmentation, mixed precision, and the config keys that choose it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from ssl_distill.config import ConfigError, load_config
from ssl_distill.models import BackboneSpec, RopeViTBackbone, build_backbone
from ssl_distill.models.backbone import random_init_like


def rel_err(ours: Tensor, ref: Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def images(h: int, w: int, n: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


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
