"""Linear probes: the joint head grid against torch's SGD, selection on held-out data, the three modes end to end."""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ssl_distill.checkpoints import FORMAT, atomic_save
from ssl_distill.config import config_to_dict, load_config
from ssl_distill.engine.train import build_model
from ssl_distill.errors import DataError
from ssl_distill.eval import linear as L
from ssl_distill.eval.features import FeatureSet

ROOT = Path(__file__).resolve().parents[1]
D, C = 8, 4


def synthetic(n: int, seed: int, blocks: int = 4, noise: float = 1.0) -> FeatureSet:
    """Features [cls x blocks, mean] of width (blocks + 1) * D; the class shows in the last CLS block."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = noise * torch.randn(n, (blocks + 1) * D, generator=g)
    means = torch.randn(C, D, generator=torch.Generator().manual_seed(99)) * 2
    x[:, (blocks - 1) * D : blocks * D] += means[y]
    return FeatureSet(x, y, [str(c) for c in range(C)])


def torch_reference(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, head: L.HeadSpec, w0: torch.Tensor,
                    epochs: int, batch: int, seed: int) -> nn.Linear:
    """One head trained the usual way: nn.Linear, autograd, torch.optim.SGD, per-iteration cosine schedule."""
    start, stop = head.columns(D, 4)
    lin = nn.Linear(stop - start, C)
    with torch.no_grad():
        lin.weight.copy_(w0)
        lin.bias.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=head.lr * batch / 256, momentum=0.9, weight_decay=0)
    total = math.ceil(idx.numel() / batch) * epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = idx[torch.randperm(idx.numel(), generator=g)]
        for s in range(0, idx.numel(), batch):
            b = order[s : s + batch]
            loss = F.cross_entropy(lin(x[b, start:stop]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return lin


def test_grid_heads_match_torch_sgd_and_are_independent() -> None:
    data = synthetic(300, 0)
    idx = torch.arange(0, 300, 2)  # a subset, as the held-out split leaves
    heads = [L.HeadSpec(1, False, 0.05), L.HeadSpec(4, True, 0.2), L.HeadSpec(4, True, 0.01), L.HeadSpec(1, True, 1.0)]
    grid = L.LinearGrid(heads, D, C, batch_size=32, seed=3)
    w0 = [grid.head_state(i)["weight"].clone() for i in range(len(heads))]
    grid.fit(data.features, data.labels, idx, epochs=3, seed=5)
    for i, h in enumerate(heads):
        ref = torch_reference(data.features, data.labels, idx, h, w0[i], epochs=3, batch=32, seed=5)
        state = grid.head_state(i)
        torch.testing.assert_close(state["weight"], ref.weight.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state["bias"], ref.bias.detach(), rtol=1e-4, atol=1e-5)
    # trained alone, a head ends where it ends in the grid
    alone = L.LinearGrid([heads[1]], D, C, batch_size=32, seed=3)
    for grp in alone.groups:
        grp["w"][: C] = w0[1]
    alone.fit(data.features, data.labels, idx, epochs=3, seed=5)
    torch.testing.assert_close(alone.head_state(0)["weight"], grid.head_state(1)["weight"], rtol=1e-5, atol=1e-6)


def test_bf16_grid_close_to_fp32() -> None:
    data = synthetic(400, 1)
    idx = torch.arange(400)
    heads = L.head_grid((1, 4), (False, True), (0.01, 0.1))
    acc = {}
    for compute in ("fp32", "bf16"):
        grid = L.LinearGrid(heads, D, C, batch_size=64, seed=0, compute=compute)
        grid.fit(data.features, data.labels, idx, epochs=4)
        acc[compute] = [L.topk_accuracy(grid.logits(data.features)[:, i], data.labels)[0] for i in range(len(heads))]
    assert max(abs(a - b) for a, b in zip(acc["fp32"], acc["bf16"])) < 3.0
    assert max(acc["bf16"]) > 90


def test_stratified_holdout() -> None:
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 1)
    tr, ho = L.stratified_holdout(labels, 0.1, seed=0)
    assert set(tr.tolist()) | set(ho.tolist()) == set(range(71)) and not set(tr.tolist()) & set(ho.tolist())
    assert torch.bincount(labels[ho], minlength=3).tolist() == [5, 2, 0]
    assert torch.equal(L.stratified_holdout(labels, 0.1, seed=0)[1], ho)
    assert not torch.equal(L.stratified_holdout(labels, 0.1, seed=1)[1], ho)


def test_fast_probe_selects_on_held_out_not_test() -> None:
    train, test = synthetic(600, 2), synthetic(200, 3)
    res = L.fast_probe(train, test, D, 4, epochs=5, batch_size=64, holdout=0.2, seed=0)
    assert res["n_heads"] == 52 and len(res["grid"]) == 52
    assert {(r["blocks"], r["avgpool"]) for r in res["grid"]} == {(1, False), (1, True), (4, False), (4, True)}
    assert len({r["lr"] for r in res["grid"]}) == 13 and min(L.LR_GRID) == 1e-5 and max(L.LR_GRID) == 0.1
    best = res["best"]
    assert best["holdout_top1"] == max(r["holdout_top1"] for r in res["grid"])
    assert res["top1"] == best["test_top1"] > 90 and (res["n_train"], res["n_holdout"]) == (480, 120)
    # test labels that carry no signal change the test figures, never the chosen head
    shuffled = FeatureSet(test.features, test.labels[torch.randperm(200, generator=torch.Generator().manual_seed(0))],
                          test.classes)
    res2 = L.fast_probe(train, shuffled, D, 4, epochs=5, batch_size=64, holdout=0.2, seed=0)
    assert res2["best"]["name"] == best["name"] and res2["top1"] < 60
    assert len(res["per_class"]) == C and res["best_head_state"]["weight"].shape[0] == C


def test_schedule_length_and_standardization() -> None:
    assert L.default_epochs(54000, 256) == 60  # Fashion-MNIST: 211 iterations per epoch
    assert L.default_epochs(1_281_167, 1024) == 10  # ImageNet: DINOv2's 12,500 iterations are 10 epochs
    train, test = synthetic(400, 6), synthetic(100, 7)
    scale = torch.logspace(-2, 1, train.features.shape[1])  # badly conditioned columns
    train = FeatureSet(train.features * scale + 3.0, train.labels, train.classes)
    test = FeatureSet(test.features * scale + 3.0, test.labels, test.classes)
    kw = dict(epochs=3, batch_size=32, holdout=0.2, heads=L.head_grid((1, 4), (True,), (0.01, 0.1)))
    raw = L.fast_probe(train, test, D, 4, **kw)
    std = L.fast_probe(train, test, D, 4, standardize=True, **kw)
    assert std["standardize"] and std["iterations"] == 3 * 10
    assert std["top1"] > 90 and std["best"]["holdout_top1"] >= raw["best"]["holdout_top1"]


def test_logreg_probe() -> None:
    res = L.logreg_probe(synthetic(300, 4), synthetic(100, 5), cs=(0.01, 1.0), holdout=0.2)
    assert res["top1"] > 90 and {r["C"] for r in res["grid"]} == {0.01, 1.0}
    assert res["n_train"] == 300
    assert res["best_C_at_grid_edge"] == L.grid_edge(res["best"]["C"], [0.01, 1.0]) is not None


def test_selection_on_the_grid_edge_is_flagged() -> None:
    assert L.grid_edge(0.1, L.LR_GRID) == "high" and L.grid_edge(1e-5, L.LR_GRID) == "low"
    assert L.grid_edge(1e-3, L.LR_GRID) is None and L.grid_edge(0.1, [0.1]) is None
    train, test = synthetic(400, 6), synthetic(100, 7)
    kw = dict(epochs=2, batch_size=32, holdout=0.2)
    # learning rates far too small to train in 2 epochs: the largest one wins, on the edge of the grid
    low = L.fast_probe(train, test, D, 4, heads=L.head_grid((1,), (True,), (1e-6, 1e-5, 1e-4)), **kw)
    assert low["best"]["lr"] == 1e-4 and low["best_lr_at_grid_edge"] == "high"
    mid = L.fast_probe(train, test, D, 4, heads=L.head_grid((1,), (True,), (1e-2, 1e-1, 1e2)), **kw)
    assert mid["best"]["lr"] != 1e2 and mid["best_lr_at_grid_edge"] in (None, "low")


def test_random_resized_crop_flip_is_a_function_of_the_seed() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    t = L.RandomResizedCropFlip(24)
    a, b, c = t(img, 7), t(img, 7), t(img, 8)
    assert a.shape == (3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------------
# End to end on a tiny run directory and an official-layout file
# ----------------------------------------------------------------------------------------------------
def make_folder(root: Path, n: int, seed: int) -> Path:
    """Two classes of 16 x 16 images: bright left half vs bright right half, with noise."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("left", "right")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.normal(60, 30, (16, 16))
            if c == 0:
                img[:, :8] += 120
            else:
                img[:, 8:] += 120
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGB").save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("lin")
    train, val = make_folder(base / "train", 20, 0), make_folder(base / "val", 8, 1)
    cfg = load_config(ROOT / "configs" / "dino_tiny_fmnist.yaml", [
        "model.depth=2", "model.patch_size=8", "model.img_size=16", "model.out_dim=32", "model.hidden_dim=16",
        "model.bottleneck_dim=8", "data.crops.global_size=16", "data.crops.local_size=8",
        "knn.image_size=16", "knn.resize_size=16", f"run.output_dir={base / 'run'}"])
    torch.manual_seed(0)
    teacher, student = build_model(cfg, 0.0), build_model(cfg, 0.0)
    atomic_save({"format": FORMAT, "teacher": teacher.state_dict(), "student": student.state_dict(),
                 "config": config_to_dict(cfg)}, base / "run" / "checkpoint.pth")
    # the same backbone as an official DINO backbone release (timm names, bare state dict)
    bare = {k[len("backbone.vit."):]: v for k, v in teacher.state_dict().items() if k.startswith("backbone.vit.")}
    torch.save(bare, base / "dino_release.pth")
    return {"base": base, "train": train, "val": val, "run": base / "run", "official": base / "dino_release.pth"}


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    L.add_arguments(parser)
    return L.run(parser.parse_args([str(a) for a in argv]))


def test_fast_and_logreg_from_the_command_line(setup: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    common = ["--train", setup["train"], "--val", setup["val"], "--num-workers", "0", "--precision", "fp32"]
    assert cli(setup["run"], *common, "--epochs", "3", "--head-batch-size", "8", "--holdout", "0.25") == 0
    res = json.loads((setup["run"] / "linear_fast.json").read_text())
    assert res["n_heads"] == 52 and res["checkpoint"]["format"] == "ssl-distill"
    assert {r["blocks"] for r in res["grid"]} == {1, 2}  # depth 2: "last 4" becomes the last 2
    assert res["image"]["image_size"] == 16 and not res["features"]["train"]["cached"]
    # the reported top-1 is the saved best head's accuracy on the (cached) test features, recomputed here
    head = torch.load(res["best_head_file"], weights_only=True)
    test = torch.load(res["features"]["test"]["cache_file"], weights_only=True)
    start, stop = head["columns"]
    pred = (test["features"][:, start:stop].float() @ head["weight"].t() + head["bias"]).argmax(dim=1)
    assert res["n_test"] == 16 and res["top1"] == pytest.approx(100.0 * int((pred == test["labels"]).sum()) / 16)
    assert res["top1"] == res["best"]["test_top1"] and head["head"]["lr"] == res["best"]["lr"]
    assert "test top-1" in capsys.readouterr().out
    assert cli(setup["run"], *common, "--epochs", "3", "--head-batch-size", "8", "--holdout", "0.25",
               "--out", setup["base"] / "again.json", "--cache-dir", setup["run"] / "features") == 0
    assert json.loads((setup["base"] / "again.json").read_text())["features"]["train"]["cached"]

    out = setup["base"] / "official_logreg.json"
    assert cli(setup["official"], *common, "--mode", "logreg", "--image-size", "16", "--cs", "0.1", "1",
               "--holdout", "0.25", "--out", out) == 0
    res = json.loads(out.read_text())
    assert res["checkpoint"]["format"] == "dino" and res["mode"] == "logreg" and res["top1"] >= 50


def test_faithful_mode_resumes_to_the_same_head(setup: dict[str, Path]) -> None:
    common = ["--train", setup["train"], "--val", setup["val"], "--num-workers", "0", "--precision", "fp32",
              "--mode", "faithful", "--epochs", "2", "--batch-size", "16", "--n-last-blocks", "2", "--lr", "0.5"]
    full, part = setup["base"] / "full.json", setup["base"] / "part.json"
    assert cli(setup["run"], *common, "--out", full) == 0
    res = json.loads(full.read_text())
    assert res["complete"] and res["epoch"] == 2 and len(res["history"]) == 2 and res["layout"] == "cls@2"
    # interrupted after 1 of the 3 steps of epoch 0 (40 images / 16), then after epoch 1's second step
    assert cli(setup["run"], *common, "--out", part, "--stop-after-steps", "1") == 0
    assert not json.loads(part.read_text())["complete"]
    assert cli(setup["run"], *common, "--out", part, "--stop-after-steps", "5") == 0
    assert cli(setup["run"], *common, "--out", part) == 0
    res_p = json.loads(part.read_text())
    assert res_p["complete"] and res_p["step"] == res["step"] == 6
    a = torch.load(setup["base"] / "full_run" / "linear_head.pth", weights_only=True)
    b = torch.load(setup["base"] / "part_run" / "linear_head.pth", weights_only=True)
    torch.testing.assert_close(a["weight"], b["weight"], rtol=0, atol=1e-6)
    assert res_p["top1"] == pytest.approx(res["top1"])
    # other settings refuse to resume the same run
    with pytest.raises(Exception, match="other settings"):
        cli(setup["run"], *common[:-2], "--lr", "0.1", "--out", part, "--epochs", "3")


class Interrupted(Exception):
    """Stands for the process being killed at that point."""


@pytest.mark.parametrize("batch_size", [8, 16])  # 40 train images: 5 full batches / 2 full and a partial one of 8
def test_faithful_resume_after_the_epochs_last_step_checkpoint_is_exact(setup: dict[str, Path], batch_size: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    steps = -(-40 // batch_size)  # per epoch: the loader keeps the last partial batch
    common = ["--train", setup["train"], "--val", setup["val"], "--num-workers", "0", "--precision", "fp32",
              "--mode", "faithful", "--epochs", "2", "--batch-size", str(batch_size), "--n-last-blocks", "2",
              "--lr", "0.5", "--checkpoint-every", str(steps)]
    full, part = setup["base"] / f"edge_full{batch_size}.json", setup["base"] / f"edge_part{batch_size}.json"
    assert cli(setup["run"], *common, "--out", full) == 0
    # killed during epoch 0's validation, after the checkpoint written on that epoch's last step
    evaluate = L._evaluate_head

    def killed(*args: object, **kwargs: object) -> None:
        raise Interrupted

    monkeypatch.setattr(L, "_evaluate_head", killed)
    with pytest.raises(Interrupted):
        cli(setup["run"], *common, "--out", part)
    state = torch.load(part.with_name(part.stem + "_run") / "linear_checkpoint.pth", weights_only=True)["state"]
    assert (state["epoch"], state["batch"], state["step"], state["history"]) == (0, steps, steps, [])
    monkeypatch.setattr(L, "_evaluate_head", evaluate)
    assert cli(setup["run"], *common, "--out", part) == 0  # the same command resumes

    res, res_p = json.loads(full.read_text()), json.loads(part.read_text())
    assert res_p["complete"] and res_p["step"] == res["step"] == 2 * steps
    assert res_p["history"] == res["history"]  # every epoch's val top-1 / top-5 / loss, train loss and lr
    assert (res_p["top1"], res_p["top5"], res_p["best_top1_over_epochs"]) == (
        res["top1"], res["top5"], res["best_top1_over_epochs"])
    a = torch.load(full.with_name(full.stem + "_run") / "linear_head.pth", weights_only=True)
    b = torch.load(part.with_name(part.stem + "_run") / "linear_head.pth", weights_only=True)
    assert torch.equal(a["weight"], b["weight"]) and torch.equal(a["bias"], b["bias"])


def test_linear_defaults_to_fp32_features_and_heads_and_records_them(setup: dict[str, Path]) -> None:
    common = ["--train", setup["train"], "--val", setup["val"], "--num-workers", "0", "--no-cache"]
    fast = ["--epochs", "1", "--blocks", "1", "--lrs", "0.01", "--head-batch-size", "8", "--holdout", "0.25"]
    out = setup["base"] / "precision.json"
    assert cli(setup["run"], *common, *fast, "--out", out) == 0
    res = json.loads(out.read_text())
    assert (res["precision"], res["compute"]) == ("fp32", "fp32")  # features as DINO's eval_linear, heads as DINOv2's
    assert cli(setup["run"], *common, *fast, "--precision", "bf16", "--head-precision", "bf16", "--out", out) == 0
    res = json.loads(out.read_text())
    assert (res["precision"], res["compute"]) == ("bf16", "bf16")
    faithful = setup["base"] / "precision_faithful.json"
    assert cli(setup["run"], *common, "--mode", "faithful", "--epochs", "1", "--batch-size", "40",
               "--out", faithful) == 0
    res = json.loads(faithful.read_text())
    assert res["complete"] and res["precision"] == "fp32"
    run_dir = faithful.with_name(faithful.stem + "_run")
    assert torch.load(run_dir / "linear_checkpoint.pth", weights_only=True)["settings"]["precision"] == "fp32"


def test_python_m_entry_point(setup: dict[str, Path]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ssl_distill.eval.linear", str(setup["official"]), "--train", str(setup["train"]),
         "--val", str(setup["val"]), "--num-workers", "0", "--image-size", "16", "--epochs", "1", "--blocks", "1",
         "--lrs", "0.01", "--head-batch-size", "8", "--holdout", "0.25", "--out", str(setup["base"] / "m.json")],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads((setup["base"] / "m.json").read_text())["n_heads"] == 2
    bad = subprocess.run([sys.executable, "-m", "ssl_distill.eval.linear", str(setup["train"] / "left" / "0.png"),
                          "--train", str(setup["train"]), "--val", str(setup["val"])],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_a_class_mismatch_is_refused_before_any_feature_is_extracted(setup: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    val = make_folder(tmp_path / "val", 2, 2)
    (val / "right").rename(val / "middle")
    cache = tmp_path / "cache"
    for mode in ("fast", "logreg"):
        with pytest.raises(DataError, match=r"different classes: \['middle', 'right'\]"):
            cli(setup["run"], "--train", setup["train"], "--val", val, "--num-workers", "0", "--mode", mode,
                "--cache-dir", cache, "--out", tmp_path / "out.json")
    assert not cache.exists() and not (tmp_path / "out.json").exists()  # nothing extracted, nothing cached


def test_faithful_mode_stops_on_unreadable_images_with_the_probes_advice(setup: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    import shutil
    import warnings

    from ssl_distill.data.folder import BadImageWarning

    for broken in ("train", "val"):  # 2 of 40 train images (5%), then 1 of 16 val images (6%): above 1%
        train, val = shutil.copytree(setup["train"], tmp_path / broken / "train"), shutil.copytree(
            setup["val"], tmp_path / broken / "val")
        files = sorted((train if broken == "train" else val).rglob("*.png"))
        for f in files[:2] if broken == "train" else files[-1:]:
            f.write_bytes(b"\x89PNG cut short")
        out = tmp_path / broken / "res.json"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadImageWarning)
            with pytest.raises(DataError, match=r"images were unreadable and substituted") as err:
                cli(setup["run"], "--train", train, "--val", val, "--num-workers", "0", "--mode", "faithful",
                    "--epochs", "1", "--batch-size", "16", "--n-last-blocks", "1", "--out", out)
        assert str(err.value).startswith("2 of 40" if broken == "train" else "1 of 16")
        assert str(err.value).endswith(L.FAITHFUL_ADVICE) and not out.exists()
        assert not (tmp_path / broken / "res_run" / "linear_head.pth").exists()


def test_feature_extraction_on_unreadable_images_says_to_delete_them_and_deleting_works(
        setup: dict[str, Path], tmp_path: Path) -> None:
    import shutil
    import warnings

    from ssl_distill.data.folder import EVAL_ADVICE, BadImageWarning

    val = shutil.copytree(setup["val"], tmp_path / "val")
    broken = sorted(val.rglob("*.png"))[-1]
    broken.write_bytes(b"not an image")
    args = [setup["run"], "--train", setup["train"], "--val", val, "--num-workers", "0", "--mode", "logreg",
            "--holdout", "0.25", "--no-cache", "--out", tmp_path / "res.json"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        with pytest.raises(DataError, match=r"1 of 16 images were unreadable") as err:
            cli(*args)
    assert str(err.value).endswith(EVAL_ADVICE) and not (tmp_path / "res.json").exists()
    broken.unlink()  # as the message says: the folder is scanned afresh
    assert cli(*args) == 0 and json.loads((tmp_path / "res.json").read_text())["n_test"] == 15
