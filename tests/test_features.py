"""Feature layouts (CLS, last-n CLS, mean patch, CLS+mean, DINO's interleaved layout) and the feature cache."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_distill.eval.features import ImageSettings, backbone_fingerprint, extract_folder
from ssl_distill.models import BackboneSpec, ViTBackbone
from ssl_distill.models.frozen_features import FeatureExtractor, FeatureSpec, amp_dtype_for

TINY = BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=3)


@pytest.fixture(scope="module")
def backbone() -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone(TINY).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("feat")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_spec_dims_and_validation() -> None:
    assert FeatureSpec().dim(384) == 384
    assert FeatureSpec("cls", 4).dim(384) == 1536
    assert FeatureSpec("cls+mean", 4).dim(384) == 1920
    assert FeatureSpec("mean").dim(384) == FeatureSpec("cls+mean-dino").dim(384) // 2 == 384
    for bad in (dict(layout="avg"), dict(layout="mean", n_last_blocks=2), dict(layout="cls+mean-dino", n_last_blocks=4),
                dict(n_last_blocks=0)):
        with pytest.raises(ValueError):
            FeatureSpec(**bad)
    with pytest.raises(ValueError, match="exceeds"):
        FeatureExtractor(ViTBackbone(TINY), FeatureSpec("cls", 4))


def test_layouts_against_the_tokens(backbone: ViTBackbone) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        blocks = backbone.get_intermediate_layers(x, n=3)
        tokens = backbone.forward_tokens(x)
        torch.testing.assert_close(blocks[-1][:, 0], tokens["cls"])  # last block + final norm = forward
        cls, mean = tokens["cls"], tokens["patch"].mean(dim=1)
        f = lambda *a: FeatureExtractor(backbone, FeatureSpec(*a))(x)  # noqa: E731
        torch.testing.assert_close(f("cls"), cls)
        torch.testing.assert_close(f("mean"), mean)
        torch.testing.assert_close(f("cls", 3), torch.cat([b[:, 0] for b in blocks], dim=1))
        torch.testing.assert_close(f("cls+mean", 2), torch.cat([blocks[1][:, 0], blocks[2][:, 0], mean], dim=1))
        # DINO eval_linear (n_last_blocks=1, avgpool_patchtokens=True)
        dino = torch.cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), dim=-1).reshape(2, -1)
        torch.testing.assert_close(f("cls+mean-dino"), dino)
        assert f("cls+mean-dino")[0, 1] == mean[0, 0]


def test_mean_excludes_registers() -> None:
    torch.manual_seed(1)
    bb = ViTBackbone(BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2, reg_tokens=4,
                                  no_embed_class=True, layer_scale=0.1)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tok = bb.forward_tokens(x)
        assert tok["patch"].shape == (2, 16, 192) and tok["reg"].shape == (2, 4, 192)
        torch.testing.assert_close(FeatureExtractor(bb, FeatureSpec("mean"))(x), tok["patch"].mean(1))


def test_cache_reuse_and_invalidation(backbone: ViTBackbone, folder: Path, tmp_path: Path) -> None:
    ext = FeatureExtractor(backbone, FeatureSpec("cls+mean", 2))
    settings = ImageSettings(32, 32)
    kw = dict(precision="fp32", batch_size=4, num_workers=0, cache_dir=tmp_path / "cache")
    first = extract_folder(ext, folder, settings, **kw)
    assert not first.cached and first.features.shape == (15, 3 * 192)
    assert first.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert first.classes == ["a", "b", "c"] and first.meta["images_per_s"] > 0
    again = extract_folder(ext, folder, settings, **kw)
    assert again.cached and torch.equal(again.features, first.features)
    assert len(list((tmp_path / "cache").iterdir())) == 1

    # other settings, other entries; the first stays valid
    assert not extract_folder(ext, folder, ImageSettings(24, 32), **kw).cached
    assert not extract_folder(FeatureExtractor(backbone, FeatureSpec()), folder, settings, **kw).cached
    half = extract_folder(ext, folder, settings, dtype=torch.float16, **kw)
    assert half.features.dtype == torch.float16 and not half.cached
    torch.testing.assert_close(half.features.float(), first.features, rtol=2e-3, atol=2e-3)
    assert extract_folder(ext, folder, settings, **kw).cached

    # changed data: a file rewritten (new size and time) -> extracted again
    target = folder / "b" / "0.png"
    Image.new("RGB", (40, 36), (200, 10, 10)).save(target)
    os.utime(target, ns=(1, 1))
    changed = extract_folder(ext, folder, settings, **kw)
    assert not changed.cached and not torch.equal(changed.features[5], first.features[5])
    torch.testing.assert_close(changed.features[:5], first.features[:5])

    # changed weights -> another key
    other = ViTBackbone(TINY).eval()
    assert backbone_fingerprint(other) != backbone_fingerprint(backbone)
    assert not extract_folder(FeatureExtractor(other, FeatureSpec("cls+mean", 2)), folder, settings, **kw).cached


def test_bf16_features_close_to_fp32(backbone: ViTBackbone, folder: Path) -> None:
    ext = FeatureExtractor(backbone, FeatureSpec("cls", 2))
    settings = ImageSettings(32, 32)
    f32 = extract_folder(ext, folder, settings, precision="fp32", batch_size=8, num_workers=0)
    bf16 = extract_folder(ext, folder, settings, precision="bf16", batch_size=8, num_workers=0)
    cos = torch.nn.functional.cosine_similarity(f32.features, bf16.features, dim=1)
    assert cos.min() > 0.99
    assert amp_dtype_for("fp32", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="CUDA"):
        amp_dtype_for("fp16", torch.device("cpu"))
