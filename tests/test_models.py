import pytest
import torch
from torch import nn

from ssl_distill.models import BackboneSpec, DINOHead, MultiCropModel, ViTBackbone, WeightNormLinear, group_by_resolution

TINY = BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2)


def test_backbone_any_resolution_and_named_tokens():
    torch.manual_seed(0)
    bb = ViTBackbone(TINY).eval()
    for size in (32, 16, 48):
        out = bb.forward_tokens(torch.randn(2, 3, size, size))
        assert out["cls"].shape == (2, 192) and out["patch"].shape == (2, (size // 8) ** 2, 192)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(bb(x), bb.forward_tokens(x)["cls"])


def test_fused_and_plain_attention_agree():
    torch.manual_seed(0)
    bb = ViTBackbone(TINY).eval()
    x = torch.randn(3, 3, 32, 32)
    bb.set_fused_attn(True)
    a = bb(x)
    bb.set_fused_attn(False)
    torch.testing.assert_close(a, bb(x), rtol=1e-4, atol=1e-5)


def test_sizes_follow_the_standard_vits():
    for arch, width in (("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768)):
        assert BackboneSpec(arch=arch).dims()[0] == width
    with pytest.raises(ValueError, match="unknown ViT size"):
        BackboneSpec(arch="vit_huge_x").dims()


def test_weight_norm_linear_matches_torch_weight_norm():
    torch.manual_seed(0)
    ours = WeightNormLinear(16, 10).double()
    ref = nn.utils.weight_norm(nn.Linear(16, 10, bias=False).double())
    with torch.no_grad():
        ref.weight_v.copy_(ours.weight_v)
        ours.weight_g.uniform_(0.5, 2.0)
        ref.weight_g.copy_(ours.weight_g)
    x = torch.randn(4, 16, dtype=torch.double)
    y1, y2 = ours(x), ref(x)
    torch.testing.assert_close(y1, y2)
    (y1 ** 2).sum().backward()
    (y2 ** 2).sum().backward()
    torch.testing.assert_close(ours.weight_v.grad, ref.weight_v.grad)
    torch.testing.assert_close(ours.weight_g.grad, ref.weight_g.grad)
    assert set(ours.state_dict()) == set(ref.state_dict())  # official checkpoints' key names


def test_dino_head_shapes_and_last_layer():
    head = DINOHead(192, 100, hidden_dim=64, bottleneck_dim=32, norm_last_layer=True)
    assert head(torch.randn(5, 192)).shape == (5, 100)
    assert not head.last_layer.weight_g.requires_grad and torch.all(head.last_layer.weight_g == 1)
    # with g = 1 each prototype has unit norm, so logits are cosines of the normalised bottleneck
    assert head(torch.randn(5, 192)).abs().max() <= 1 + 1e-5
    assert DINOHead(192, 100, norm_last_layer=False).last_layer.weight_g.requires_grad
    n_linear = sum(isinstance(m, nn.Linear) for m in DINOHead(192, 100, nlayers=3).mlp)
    assert n_linear == 3


def test_multicrop_groups_and_matches_per_crop_forward():
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)] + [
        torch.randn(2, 3, 16, 16)
    ]
    assert group_by_resolution(crops) == [(0, 2), (2, 4)]
    torch.manual_seed(0)
    model = MultiCropModel(ViTBackbone(TINY), DINOHead(192, 50, hidden_dim=32, bottleneck_dim=16)).eval()
    out = model(crops)
    assert out["cls"].shape == (8, 50) and out["cls_feat"].shape == (8, 192)
    per_crop = torch.cat([model.head(model.backbone(c)) for c in crops])
    torch.testing.assert_close(out["cls"], per_crop, rtol=1e-4, atol=1e-5)
