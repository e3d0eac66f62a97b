"""Weighted k-NN (DINO protocol) and feature extraction."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ssl_distill.eval.knn import run_knn
from ssl_distill.eval.results import write_results
from ssl_distill.models.frozen_features import extract_features
from ssl_distill.weighted_knn import class_scores, knn_classify, search_neighbours

T = 0.07


def dino_knn_reference(
    train: Tensor, train_y: Tensor, test: Tensor, test_y: Tensor, k: int, t: float, num_classes: int, chunk: int = 100
) -> tuple[float, float]:
    """Dense re-implementation of DINO's knn_classifier: chunks of test images, full similarity, topk, one-hot votes."""
    train = nn.functional.normalize(train.float(), dim=1)
    test = nn.functional.normalize(test.float(), dim=1)
    top1 = top5 = 0
    for s in range(0, test.shape[0], chunk):
        feats, targets = test[s : s + chunk], test_y[s : s + chunk]
        b = feats.shape[0]
        dist, idx = torch.mm(feats, train.t()).topk(k, dim=1, largest=True, sorted=True)
        neighbours = torch.gather(train_y.view(1, -1).expand(b, -1), 1, idx)
        one_hot = torch.zeros(b * k, num_classes).scatter_(1, neighbours.view(-1, 1), 1)
        probs = (one_hot.view(b, k, num_classes) * dist.div(t).exp().view(b, k, 1)).sum(1)
        _, pred = probs.sort(1, True)
        correct = pred.eq(targets.view(-1, 1))
        top1 += correct.narrow(1, 0, 1).sum().item()
        top5 += correct.narrow(1, 0, min(5, k, num_classes)).sum().item()
    return 100.0 * top1 / test.shape[0], 100.0 * top5 / test.shape[0]


def clustered(n: int, m: int, d: int, c: int, noise: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=g)
    ytr = torch.randint(0, c, (n,), generator=g)
    yte = torch.randint(0, c, (m,), generator=g)
    xtr = means[ytr] + noise * torch.randn(n, d, generator=g)
    xte = means[yte] + noise * torch.randn(m, d, generator=g)
    return xtr, ytr, xte, yte


# train: class 0 at (1,0), (0.8,0.6), (0,1); class 1 at (0.6,0.8), (-1,0), (0,-1)
TINY_TRAIN = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [0.0, -1.0]])
TINY_TRAIN_Y = torch.tensor([0, 0, 0, 1, 1, 1])
TINY_TEST = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
TINY_TEST_Y = torch.tensor([0, 1, 1])


def test_tiny_example_by_hand() -> None:
    e = lambda s: math.exp(s / T)  # noqa: E731
    # query (0.8,0.6): sims 0.8, 1.0, 0.6 | 0.96, -0.8, -0.6 -> k=3: 1.0(c0), 0.96(c1), 0.8(c0)
    # query (0.6,0.8): sims 0.6, 0.96, 0.8 | 1.0, -0.6, -0.8 -> 1.0(c1), 0.96(c0), 0.8(c0): the minority class
    #                  wins, e(1.0) = 1.60e6 > e(0.96) + e(0.8) = 9.95e5
    # query (0,1):     sims 0, 0.6, 1.0 | 0.8, 0, -1       -> 1.0(c0), 0.8(c1), 0.6(c0): class 0, wrong
    expected = torch.tensor(
        [[e(1.0) + e(0.8), e(0.96)], [e(0.96) + e(0.8), e(1.0)], [e(1.0) + e(0.6), e(0.8)]]
    )
    sims, idx = search_neighbours(TINY_TRAIN, TINY_TEST, 3)
    assert idx.tolist() == [[1, 3, 0], [3, 1, 2], [2, 3, 1]]
    scores = class_scores(sims, TINY_TRAIN_Y[idx], T, 2)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)
    assert scores.argmax(1).tolist() == [0, 1, 0]

    res = knn_classify(TINY_TRAIN, TINY_TRAIN_Y, TINY_TEST, TINY_TEST_Y, ks=(3,), temperature=T)
    assert set(res) == {"k=3"}
    assert res["k=3"]["top1"] == pytest.approx(200 / 3)
    assert res["k=3"]["top5"] == pytest.approx(100.0)  # 2 classes: top-5 covers both
    assert res["k=3"]["per_class"] == [pytest.approx(100.0), pytest.approx(50.0)]
    assert res["k=3"]["k"] == 3


@pytest.mark.parametrize("num_classes,noise", [(10, 1.5), (40, 3.0)])
def test_matches_dense_dino_reference(num_classes: int, noise: float) -> None:
    xtr, ytr, xte, yte = clustered(3000, 500, 32, num_classes, noise, seed=num_classes)
    ks = (1, 3, 10, 20, 100, 200)
    reference = {k: dino_knn_reference(xtr, ytr, xte, yte, k, T, num_classes) for k in ks}
    for engine in ("faiss", "torch"):
        res = knn_classify(xtr, ytr, xte, yte, ks=ks, temperature=T, query_chunk=128, engine=engine)
        for k in ks:
            assert (res[f"k={k}"]["top1"], res[f"k={k}"]["top5"]) == reference[k], (engine, k)
        assert 0 < res["k=20"]["top1"] < 100  # not a trivial problem


def test_engines_agree_on_neighbours() -> None:
    xtr, _, xte, _ = clustered(2000, 300, 24, 5, 1.0, seed=1)
    xtr, xte = nn.functional.normalize(xtr, dim=1), nn.functional.normalize(xte, dim=1)
    s_f, i_f = search_neighbours(xtr, xte, 50, engine="faiss")
    s_t, i_t = search_neighbours(xtr, xte, 50, engine="torch", query_chunk=64)
    torch.testing.assert_close(s_f, s_t, rtol=0, atol=1e-5)
    assert torch.equal(i_f, i_t)


def test_k_prefix_single_search() -> None:
    xtr, ytr, xte, yte = clustered(1500, 200, 16, 6, 1.5, seed=2)
    xtr_n, xte_n = nn.functional.normalize(xtr, dim=1), nn.functional.normalize(xte, dim=1)
    s_max, i_max = search_neighbours(xtr_n, xte_n, 100)
    for k in (1, 10, 20, 100):
        s_k, i_k = search_neighbours(xtr_n, xte_n, k)
        assert torch.equal(i_max[:, :k], i_k)
        torch.testing.assert_close(s_max[:, :k], s_k, rtol=0, atol=1e-6)
    together = knn_classify(xtr, ytr, xte, yte, ks=(10, 20, 100))
    for k in (10, 20, 100):
        assert knn_classify(xtr, ytr, xte, yte, ks=(k,))[f"k={k}"] == together[f"k={k}"]


def test_top5_with_fewer_classes_and_k_above_n() -> None:
    xtr, ytr, xte, yte = clustered(40, 30, 8, 3, 2.0, seed=3)
    res = knn_classify(xtr, ytr, xte, yte, ks=(10, 200))
    assert res["k=10"]["top5"] == 100.0  # 3 classes: top-5 is over all of them
    assert res["k=200"]["k"] == 40  # clipped to N
    assert res["k=200"] == {**knn_classify(xtr, ytr, xte, yte, ks=(40,))["k=40"]}
    top1, top5 = dino_knn_reference(xtr, ytr, xte, yte, 40, T, 3)
    assert (res["k=200"]["top1"], res["k=200"]["top5"]) == (top1, top5)
    # k=2 with 4 classes: DINO counts top-5 over min(5, k) = 2 ranked classes
    xtr, ytr, xte, yte = clustered(200, 100, 8, 4, 3.0, seed=4)
    res = knn_classify(xtr, ytr, xte, yte, ks=(2,))
    assert (res["k=2"]["top1"], res["k=2"]["top5"]) == dino_knn_reference(xtr, ytr, xte, yte, 2, T, 4)
    assert res["k=2"]["top5"] < 100.0


def test_ties_follow_torch_sort_like_dino() -> None:
    # one train item per class at the same similarity -> equal class scores; DINO's descending torch.sort
    # on CPU ranks the lower class index first for small class counts
    train = torch.tensor([[0.6, 0.8], [0.6, -0.8]])
    test = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    res = knn_classify(train, torch.tensor([0, 1]), test, torch.tensor([0, 1]), ks=(2,))
    assert res["k=2"]["per_class"] == [100.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(dtype: torch.dtype) -> None:
    xtr, ytr, xte, yte = clustered(1000, 200, 32, 5, 1.5, seed=5)
    xtr, xte = xtr.to(dtype), xte.to(dtype)
    res = knn_classify(xtr, ytr, xte, yte, ks=(10, 20))
    ref = knn_classify(xtr.float(), ytr, xte.float(), yte, ks=(10, 20))
    assert res == ref  # normalized in float32 after the same up-cast


def test_per_class_and_validation() -> None:
    xtr, ytr, xte, yte = clustered(300, 60, 8, 3, 1.0, seed=6)
    res = knn_classify(xtr, ytr, xte, yte, ks=(5,), num_classes=5)
    per_class = res["k=5"]["per_class"]
    assert len(per_class) == 5 and per_class[3] is None and per_class[4] is None
    with pytest.raises(ValueError):
        knn_classify(xtr, ytr, xte, yte, num_classes=2)
    with pytest.raises(ValueError):
        knn_classify(xtr, ytr, xte, torch.full_like(yte, -1))
    with pytest.raises(ValueError):
        knn_classify(xtr, ytr, xte, yte, engine="nope")


class _Points(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(7)
        self.images = torch.randn(n, 3, 4, 4, generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor | int]:
        return {"image": self.images[i], "label": self.labels[i], "index": i}


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(48, 6)
        self.drop = nn.Dropout(0.5)  # must be off during extraction

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(x.flatten(1)))


def test_extract_features_order_by_index() -> None:
    ds = _Points(37)
    model = _TinyNet().train()
    loader = DataLoader(ds, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0))
    feats, labels = extract_features(model, loader, torch.device("cpu"))
    assert model.training  # mode restored
    assert feats.dtype == torch.float32 and feats.shape == (37, 6)
    with torch.no_grad():
        expected = model.proj(ds.images.flatten(1))
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(labels, ds.labels)

    bf16, _ = extract_features(model, loader, torch.device("cpu"), amp_dtype=torch.bfloat16)
    torch.testing.assert_close(bf16, expected, rtol=0.05, atol=0.05)

    dropped = DataLoader(ds, batch_size=5, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match="exactly once"):
        extract_features(model, dropped, torch.device("cpu"))


def test_run_knn_and_write_results(tmp_path) -> None:
    ds = _Points(30)
    loader = DataLoader(ds, batch_size=8)
    res = run_knn(_TinyNet(), loader, loader, ks=(5, 50), temperature=T, device=torch.device("cpu"), amp_dtype=None)
    assert (res["n_train"], res["n_val"], res["dim"]) == (30, 30, 6)
    assert res["k=5"]["top1"] == 100.0  # same set: every item finds itself (nothing excluded)
    assert res["k=50"]["k"] == 30
    out = tmp_path / "sub" / "knn.json"
    write_results(res, out)
    assert json.loads(out.read_text())["k=5"]["top1"] == 100.0
    assert [p.name for p in out.parent.iterdir()] == ["knn.json"]


# ----------------------------------------------------------------------------------------------------
# Several temperatures, bounded-memory search, layouts and cache through knn_on_checkpoint
# ----------------------------------------------------------------------------------------------------
def test_several_temperatures_from_one_search(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl_distill.weighted_knn as knn_mod

    xtr, ytr, xte, yte = clustered(1000, 200, 16, 5, 2.0, seed=8)
    calls = {"n": 0}
    original = knn_mod.search_neighbours

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(knn_mod, "search_neighbours", counting)
    res = knn_classify(xtr, ytr, xte, yte, ks=(10, 20), temperature=(0.07, 0.02, 0.5))
    assert calls["n"] == 1
    assert set(res) == {"k=10", "k=20", "k=10,T=0.02", "k=20,T=0.02", "k=10,T=0.5", "k=20,T=0.5"}
    assert res["k=10"] == knn_classify(xtr, ytr, xte, yte, ks=(10,))["k=10"]
    for t in (0.02, 0.5):
        alone = knn_classify(xtr, ytr, xte, yte, ks=(10, 20), temperature=t)
        for k in (10, 20):
            assert res[f"k={k},T={t:g}"] == alone[f"k={k}"]
    assert len(res["k=20,T=0.5"]["per_class"]) == 5 and res["k=20,T=0.5"]["temperature"] == 0.5
    with pytest.raises(ValueError):
        knn_classify(xtr, ytr, xte, yte, temperature=(0.07, 0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_search_is_exact_and_bounded(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl_distill.weighted_knn as knn_mod

    xtr, ytr, xte, yte = clustered(3000, 300, 24, 6, 2.0, seed=9)
    xtr, xte = xtr.to(dtype), xte.to(dtype)
    s_ref, i_ref = search_neighbours(nn.functional.normalize(xtr.float(), dim=1),
                                     nn.functional.normalize(xte.float(), dim=1), 50)
    rows = []
    original = knn_mod._normalize
    monkeypatch.setattr(knn_mod, "_normalize", lambda x: rows.append(x.shape[0]) or original(x))
    s, i = knn_mod.search_neighbours_chunked(xtr, xte, 50, query_chunk=64, train_chunk=700)
    assert max(rows) <= 700  # never a float32 copy of the whole train set
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-5)
    res = knn_classify(xtr, ytr, xte, yte, ks=(10, 50), train_chunk=700, query_chunk=64)
    monkeypatch.undo()
    ref = knn_classify(xtr, ytr, xte, yte, ks=(10, 50))
    for k in ("k=10", "k=50"):
        assert (res[k]["top1"], res[k]["top5"]) == (ref[k]["top1"], ref[k]["top5"])


def _three_class_folders(root, n_train: int = 8, n_val: int = 4) -> None:
    """root/{train,val}/c{0,1,2}/*.png: 16 x 16 noise images of three brightness levels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                img = rng.normal(40 + 70 * c, 20, (16, 16, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.png")


def test_knn_on_official_checkpoint_with_layouts_temperatures_and_cache(tmp_path) -> None:
    from ssl_distill.eval.knn import knn_on_checkpoint
    from ssl_distill.models.frozen_features import FeatureSpec
    from ssl_distill.models import BackboneSpec, ViTBackbone

    _three_class_folders(tmp_path, 12, 6)
    torch.manual_seed(0)
    bb = ViTBackbone(BackboneSpec(arch="vit_tiny", patch_size=8, img_size=16, depth=2))
    torch.save(bb.vit.state_dict(), tmp_path / "dino_like.pth")  # a DINO backbone release: timm names
    kw = dict(train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"), precision="fp32",
              overrides=["knn.image_size=16", "knn.resize_size=16", "knn.ks=[3,10]", "knn.num_workers=0"],
              features=FeatureSpec("cls+mean-dino"), temperatures=[0.07, 0.2], feature_dtype=torch.float16,
              cache_dir=tmp_path / "cache", train_chunk=7)
    res = knn_on_checkpoint(tmp_path / "dino_like.pth", out=tmp_path / "knn.json", **kw)
    assert res["format"] == "dino" and res["features"] == "cls+mean-dino" and res["details"]["dim"] == 384
    assert set(res["accuracy"]) == {"k=3", "k=10", "k=3,T=0.2", "k=10,T=0.2"}
    assert len(res["per_class"]["k=3"]) == 3 and res["accuracy"]["k=3"]["top1"] > 80  # brightness separates
    assert res["details"]["features_cached"] == [False, False]
    again = knn_on_checkpoint(tmp_path / "dino_like.pth", out=tmp_path / "knn2.json", **kw)
    assert again["details"]["features_cached"] == [True, True] and again["accuracy"] == res["accuracy"]
    assert json.loads((tmp_path / "knn.json").read_text())["accuracy"] == res["accuracy"]

    # the same through `ssl-distill knn` (options after the positional overrides)
    from ssl_distill.cli import build_parser

    args = build_parser().parse_args([
        "knn", str(tmp_path / "dino_like.pth"), "knn.image_size=16", "knn.resize_size=16", "knn.ks=[3,10]",
        "knn.num_workers=0", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
        "--layout", "cls+mean-dino", "--temperatures", "0.07", "0.2", "--fp16-features", "--train-chunk", "7",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "knn_cli.json")])
    assert args.func(args) == 0
    cli_res = json.loads((tmp_path / "knn_cli.json").read_text())
    assert cli_res["details"]["features_cached"] == [True, True]  # fp32, the CLI default too: the same entries
    assert cli_res["accuracy"] == res["accuracy"] and cli_res["feature_dtype"] == "float16"


# ----------------------------------------------------------------------------------------------------
# Precision of the evaluation: fp32 by default (DINO's eval_knn.py), bf16 the fast option
# ----------------------------------------------------------------------------------------------------
KNN_OVERRIDES = ["knn.image_size=16", "knn.resize_size=16", "knn.ks=[3]", "knn.num_workers=0"]


def _cached_features(cache_dir, split: str) -> Tensor:
    (file,) = cache_dir.glob(f"{split}-*.pt")
    return torch.load(file, weights_only=True)["features"]


def _extract(checkpoint, folder, precision: str) -> Tensor:
    """Features of ``folder`` as knn_on_checkpoint extracts them (its image settings), at ``precision``."""
    from ssl_distill.checkpoints import load_any_backbone
    from ssl_distill.eval.features import ImageSettings, extract_folder
    from ssl_distill.models.frozen_features import FeatureExtractor

    loaded = load_any_backbone(checkpoint, "teacher")
    crops = loaded.config.data.crops
    settings = ImageSettings(16, 16, tuple(crops.mean), tuple(crops.std))
    return extract_folder(FeatureExtractor(loaded.backbone), folder, settings, precision=precision,
                          batch_size=loaded.config.knn.batch_size, num_workers=0).features


def test_knn_extracts_fp32_features_by_default_and_records_the_precision(tmp_path) -> None:
    from ssl_distill.eval.knn import knn_on_checkpoint
    from ssl_distill.models import BackboneSpec, ViTBackbone

    _three_class_folders(tmp_path)
    torch.manual_seed(0)
    bb = ViTBackbone(BackboneSpec(arch="vit_tiny", patch_size=8, img_size=16, depth=2))
    ckpt = tmp_path / "dino_like.pth"
    torch.save(bb.vit.state_dict(), ckpt)
    res = knn_on_checkpoint(ckpt, str(tmp_path / "train"), str(tmp_path / "val"), overrides=KNN_OVERRIDES,
                            out=tmp_path / "knn.json", cache_dir=tmp_path / "cache")
    assert res["precision"] == "fp32" and json.loads((tmp_path / "knn.json").read_text())["precision"] == "fp32"
    fp32 = {s: _extract(ckpt, tmp_path / s, "fp32") for s in ("train", "val")}
    bf16 = _extract(ckpt, tmp_path / "train", "bf16")
    assert not torch.equal(fp32["train"], bf16)  # the two precisions are distinguishable here
    for split in ("train", "val"):  # the features the evaluation used are exactly fp32 ones
        assert torch.equal(_cached_features(tmp_path / "cache", split), fp32[split])
    labels = torch.arange(3).repeat_interleave(8), torch.arange(3).repeat_interleave(4)
    ref = knn_classify(fp32["train"], labels[0], fp32["val"], labels[1], ks=(3,))
    assert res["accuracy"]["k=3"] == {"top1": ref["k=3"]["top1"], "top5": ref["k=3"]["top5"]}


def test_knn_precision_from_the_run_config_overridden_by_the_command_line(tmp_path) -> None:
    from pathlib import Path

    from ssl_distill.checkpoints import FORMAT, atomic_save
    from ssl_distill.cli import build_parser
    from ssl_distill.config import ConfigError, config_to_dict, load_config
    from ssl_distill.engine.train import build_model
    from ssl_distill.eval.knn import knn_on_checkpoint

    with pytest.raises(ConfigError, match="knn.precision must be fp32, bf16 or fp16"):
        load_config(None, ["knn.precision=fp64"])
    _three_class_folders(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "dino_tiny_fmnist.yaml"
    cfg = load_config(config, [
        "model.depth=2", "model.patch_size=8", "model.img_size=16", "model.out_dim=32", "model.hidden_dim=16",
        "model.bottleneck_dim=8", "data.crops.global_size=16", "data.crops.local_size=8", "knn.precision=bf16",
        f"knn.train_dir={tmp_path / 'train'}", f"knn.val_dir={tmp_path / 'val'}"])
    torch.manual_seed(0)
    run = tmp_path / "run"
    atomic_save({"format": FORMAT, "teacher": build_model(cfg, 0.0).state_dict(),
                 "student": build_model(cfg, 0.0).state_dict(), "config": config_to_dict(cfg)}, run / "checkpoint.pth")

    # the run's knn.precision (bf16) is honoured...
    res = knn_on_checkpoint(run, overrides=KNN_OVERRIDES, cache_dir=tmp_path / "cache")
    assert res["precision"] == "bf16" and json.loads((run / "knn.json").read_text())["precision"] == "bf16"
    assert torch.equal(_cached_features(tmp_path / "cache", "train"), _extract(run, tmp_path / "train", "bf16"))
    # ...a knn.precision override and --precision replace it
    assert knn_on_checkpoint(run, overrides=[*KNN_OVERRIDES, "knn.precision=fp32"])["precision"] == "fp32"
    with pytest.raises(ConfigError, match="knn.precision"):
        knn_on_checkpoint(run, overrides=[*KNN_OVERRIDES, "knn.precision=half"])
    for flag in ("fp32", "bf16"):
        args = build_parser().parse_args(["knn", str(run), *KNN_OVERRIDES, "--precision", flag,
                                          "--out", str(tmp_path / f"{flag}.json")])
        assert args.func(args) == 0
        assert json.loads((tmp_path / f"{flag}.json").read_text())["precision"] == flag


def test_knn_says_when_k_exceeds_the_train_set_and_refuses_a_single_class(tmp_path, capsys) -> None:
    """15 train images and the default ks (10, 20, 100, 200): k=20, 100 and 200 vote with all 15, and the
    output says so; a folder of one class (every answer right whatever the features) is refused."""
    import shutil

    from ssl_distill.cli import run
    from ssl_distill.models import BackboneSpec, ViTBackbone

    _three_class_folders(tmp_path, 5, 2)
    torch.manual_seed(0)
    torch.save(ViTBackbone(BackboneSpec(arch="vit_tiny", patch_size=8, img_size=16, depth=2)).vit.state_dict(),
               tmp_path / "dino_like.pth")
    argv = ["knn", str(tmp_path / "dino_like.pth"), "knn.image_size=16", "knn.resize_size=16", "knn.num_workers=0",
            "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--out", str(tmp_path / "knn.json")]
    assert run(argv) == 0
    note = ("the train folder has 15 images: k=20, k=100 and k=200 used all 15 of them (those entries are a "
            "k=15 vote); pick ks up to 15 with knn.ks=[...]")
    assert f"note: {note}" in capsys.readouterr().out
    res = json.loads((tmp_path / "knn.json").read_text())
    assert res["notes"] == [note] and [res["details"][f"k={k}"]["k"] for k in (10, 20, 100, 200)] == [10, 15, 15, 15]

    for split in ("train", "val"):  # one class left
        for c in ("c1", "c2"):
            shutil.rmtree(tmp_path / split / c)
    with pytest.raises(SystemExit) as stop:
        run(argv)
    assert stop.value.code == 1
    assert "the train and val folders have one class ('c0'): an accuracy needs at least two" in capsys.readouterr().err
