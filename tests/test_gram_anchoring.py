"""Gram anchoring in training: the config's refusals, the schedules, the Gram crops, the Gram teacher
(snapshot, refreshes, file), and tiny runs that train, stop, resume and log the monitor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_distill.config import ConfigError, load_config
from ssl_distill.engine.schedules import Schedules, warmup_cosine_constant
from test_end_to_end import CONFIG

LIVE = ["gram.weight=1", "gram.ema_teacher=true"]
FROZEN = ["gram.weight=1", "gram.it_load_ema_teacher=0", "data.crops.gram_size=56"]


@pytest.mark.parametrize("overrides, match", [
    (["gram.weight=1"], "needs a Gram teacher"),
    ([*LIVE, "data.crops.gram_size=56"], "data.crops.gram_size=56 would render crops nobody reads"),
    (["gram.weight=1", "gram.it_load_ema_teacher=0"], "a frozen Gram teacher reads its own crops"),
    ([*FROZEN, "data.crops.gram_size=50"], "gram_size=50 is not a multiple of model.patch_size=7"),
    ([*FROZEN, "gram.ckpt=run"], "gram.ckpt=run and gram.it_load_ema_teacher=0 both say where"),
    ([*LIVE, "gram.update_frequency=10"], "gram.ema_teacher=true uses the EMA teacher itself"),
    ([*FROZEN, "gram.max_updates=3"], "gram.max_updates=3 says when Gram teacher refreshes happen"),
    ([*FROZEN, "gram.it_first_update=5", "gram.max_updates=3"], "it_first_update=5, gram.max_updates=3 say"),
    ([*FROZEN, "gram.update_frequency=5", "gram.max_updates=0"], "gram.max_updates=0 is out of range"),
    (["gram.weight=1", "gram.it_load_ema_teacher=10", "gram.start_step=5", "data.crops.gram_size=56"],
     "takes the Gram teacher after gram.start_step=5"),
    ([*LIVE, "gram.remove_neg=true", "gram.remove_only_teacher_neg=true"], "choose one"),
    ([*LIVE, "data.crops.global_size=7", "data.crops.local_size=7"], "gives one patch: its Gram matrix is always"),
    ([*LIVE, "gram.dino_local_weight=0.5", "dino.weight=0", "ibot.weight=1", "masking.shape=block"],
     "reweights the DINO term's local-crop pairs, but the run has none"),
    (["data.crops.gram_size=56"], "sets up Gram anchoring, but gram.weight=0 turns its term off"),
    (["gram.ema_teacher=true", "gram.update_frequency=5"], "set up Gram anchoring, but gram.weight=0"),
])
def test_configs_that_cannot_work_are_refused_with_a_reason(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIG, overrides)


def test_working_gram_configs_load():
    load_config(CONFIG, LIVE)
    load_config(CONFIG, [*FROZEN, "gram.update_frequency=5", "gram.it_first_update=10", "gram.max_updates=3",
                         "gram.dino_local_weight=0.5", "gram.start_step=4", "gram.ramp_steps=3"])
    load_config(CONFIG, ["gram.weight=2", "gram.ckpt=some/run", "data.crops.gram_size=28"])


def test_ramp_is_dinov3s_linear_warmup_cosine_decay():
    def official(start, peak, end, warmup, total, cosine):  # dinov3/train/cosine_lr_scheduler.py, written out
        linear = np.linspace(start, peak, warmup, endpoint=False)
        c = (np.cos(np.linspace(0, np.pi, cosine)) + 1) / 2
        return np.concatenate([linear, (peak - end) * c + end, np.full(total - cosine - warmup, end)])

    for args in [(0.0, 0.0, 2.0, 10, 30, 5), (1.0, 1.0, 0.5, 3, 8, 4), (0.0, 0.0, 1.5, 0, 6, 0)]:
        start, peak, end, warmup, total, cosine = args
        assert np.array_equal(warmup_cosine_constant(start, peak, end, warmup, cosine, total),
                              official(start, peak, end, warmup, total, cosine))
    # a ramp past the run's end is cut there
    assert np.array_equal(warmup_cosine_constant(0.0, 0.0, 1.0, 4, 10, 6), official(0.0, 0.0, 1.0, 4, 14, 10)[:6])


def test_schedules_hold_the_gram_weight_and_the_dino_local_weight():
    cfg = load_config(CONFIG, [*LIVE, "gram.weight=2", "gram.start_step=5", "gram.ramp_steps=5",
                               "gram.dino_local_weight=0.5", "optim.epochs=2"])
    sched = Schedules.from_config(cfg, iters_per_epoch=10, world=1)
    w, local = sched.gram_weight, sched.dino_local_weight
    assert len(w) == len(local) == 20
    assert (w[:6] == 0).all() and w[9] == 2.0 and (w[9:] == 2.0).all()  # the ramp's first value is its start
    assert np.all(np.diff(w[5:10]) > 0) and w[7] == pytest.approx(1.0)  # half-way up the cosine
    assert (local[:6] == 1.0).all() and (local[9:] == 0.5).all() and local[7] == pytest.approx(0.75)
    plain = Schedules.from_config(load_config(CONFIG), iters_per_epoch=10, world=1)
    assert (plain.gram_weight == 0).all() and (plain.dino_local_weight == 1.0).all()  # exactly 1: DINO unchanged


# ---------------------------------------------------------------------------------------------- Gram crops
def _batch(crops_cfg, photos, transform=None, photometric=True):
    """One collated batch of the photos (seed = 100 + index), through the training views (or ``transform``)."""
    from PIL import Image

    from ssl_distill.data.collate import MultiCropCollate
    from ssl_distill.data.views import MultiCropTransform

    transform = transform or MultiCropTransform(crops_cfg)
    samples = []
    for i, path in enumerate(photos):
        img = Image.open(path).convert("RGB")
        out = transform(img, 100 + i) if not isinstance(transform, tuple) else transform[0](img, 100 + i, transform[1])
        extra = out if isinstance(out, dict) else {"image": out}
        samples.append({"label": 0, "index": i, "bad": 0, "seed": 100 + i, **extra})
    return MultiCropCollate(crops_cfg, photometric=photometric)(samples)


def _photos(photo_folder):
    return sorted(p for p in photo_folder.rglob("*") if p.suffix in (".png", ".jpg") and "extra" not in p.parts)


def test_gram_crops_leave_the_views_unchanged_and_share_their_geometry_and_photometry(photo_folder):
    import dataclasses

    from ssl_distill.config import CropsConfig

    photos = _photos(photo_folder)
    plain = CropsConfig(global_size=32, local_size=16, n_local=2)
    without = _batch(plain, photos)
    assert "gram_crops" not in without
    # same size, distortions on: exactly the global views (same box, flip and photometric draws)
    same = _batch(dataclasses.replace(plain, gram_size=32, gram_no_distortions=False), photos)
    assert all(a.equal(b) for a, b in zip(same["crops"], without["crops"]))  # the views did not move
    assert len(same["gram_crops"]) == 2 and all(g.equal(c) for g, c in zip(same["gram_crops"], without["crops"]))
    # no distortions: the global views' pixels, only normalised
    raw = _batch(plain, photos, photometric=False)["crops"]
    clean = _batch(dataclasses.replace(plain, gram_size=32), photos)["gram_crops"]
    mean, std = torch.tensor(plain.mean).view(1, 3, 1, 1), torch.tensor(plain.std).view(1, 3, 1, 1)
    for g, u8 in zip(clean, raw[:2]):
        torch.testing.assert_close(g, (u8.float() / 255 - mean) / std, rtol=0, atol=1e-6)
    # twice the size: the same box and flip at 64 px, which downsampled is the 32-px view
    big = _batch(dataclasses.replace(plain, gram_size=64), photos, photometric=False)["gram_crops"]
    for g, u8 in zip(big, raw[:2]):
        assert g.shape[-2:] == (64, 64)
        down = torch.nn.functional.interpolate(g.float(), size=(32, 32), mode="area")
        assert (down - u8.float()).abs().mean() < 6  # of 255; a mirrored or moved crop differs by far more
        assert (down.flip(-1) - u8.float()).abs().mean() > 12


def test_gram_crops_follow_the_object_aware_global_views(photo_folder):
    import dataclasses

    from ssl_distill.config import CropsConfig
    from ssl_distill.data.object_crops import ObjectMultiCropTransform

    photos = _photos(photo_folder)
    crops = CropsConfig(global_size=32, local_size=16, n_local=2)
    boxes = np.array([[10.0, 10.0, 200.0, 200.0]])
    gram = dataclasses.replace(crops, gram_size=32, gram_no_distortions=False)
    without = _batch(crops, photos, (ObjectMultiCropTransform(crops, 8), boxes))
    batch = _batch(gram, photos, (ObjectMultiCropTransform(gram, 8), boxes))
    assert batch["obj_valid"].any() and len(batch["obj_masks"]) == 4
    assert all(g.equal(c) for g, c in zip(batch["gram_crops"], without["crops"]))


# ---------------------------------------------------------------------------------------------- Gram teacher
def test_refresh_schedule_says_which_steps_copy_and_how_often():
    from ssl_distill.config import GramConfig
    from ssl_distill.engine.gram_teacher import refresh_due

    def refreshed(**keys):
        gram, done, steps = GramConfig(**keys), 0, []
        for step in range(30):
            if refresh_due(gram, step, done):
                steps.append(step)
                done += 1
        return steps

    # after every 3rd step counted from 1 (steps 2, 5, 8 ...), from step + 1 >= it_first_update, at most max_updates
    assert refreshed(update_frequency=3) == list(range(2, 30, 3))
    assert refreshed(update_frequency=3, it_first_update=7) == [8, 11, 14, 17, 20, 23, 26, 29]
    assert refreshed(update_frequency=3, it_first_update=7, max_updates=2) == [8, 11]
    assert refreshed(update_frequency=10, it_first_update=10, max_updates=3) == [9, 19, 29]  # DINOv3's 7B stage, /1e5
    assert refreshed(update_frequency=0) == []


def test_gram_teacher_snapshot_and_refresh_copy_the_ema_teacher():
    from ssl_distill.engine.gram_teacher import GramTeacher
    from ssl_distill.models import ViTBackbone, spec_from_config

    cfg = load_config(CONFIG, ["gram.weight=1", "gram.it_load_ema_teacher=3", "gram.start_step=3",
                               "data.crops.gram_size=56", "gram.update_frequency=2", "gram.it_first_update=4",
                               "gram.max_updates=1"])
    torch.manual_seed(0)
    ema = ViTBackbone(spec_from_config(cfg))
    gram = GramTeacher(cfg, ema)
    assert not gram.ready and not gram.backbone.training
    assert not any(p.requires_grad for p in gram.backbone.parameters())
    with pytest.raises(RuntimeError, match="holds no weights yet"):
        gram.patches([torch.zeros(1, 3, 56, 56)])

    def nudge() -> None:  # the EMA teacher moves on
        with torch.no_grad():
            for p in ema.parameters():
                p.add_(0.01)

    def same() -> bool:
        return all(torch.equal(a, b) for a, b in zip(gram.backbone.state_dict().values(), ema.state_dict().values()))

    nudge()
    assert not gram.before_step(2, ema) and not gram.ready and not same()
    assert gram.before_step(3, ema) and gram.ready and same()  # the snapshot, before step 3
    nudge()
    assert not gram.after_step(2, ema) and not same()  # (2 + 1) % 2 != 0
    assert gram.after_step(3, ema) and gram.refreshes == 1 and same()  # after step 3: 4 >= it_first_update
    nudge()
    assert not gram.after_step(5, ema) and not same()  # max_updates reached
    out = gram.patches([torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56)])
    assert out.shape == (4, 64, 192) and not out.requires_grad  # (56 / 7)^2 patches of 192 (vit_tiny)
    state = gram.state_dict()
    fresh = GramTeacher(cfg, ema)
    fresh.load_state_dict(state, "test")
    assert fresh.ready and fresh.refreshes == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.backbone.state_dict().values(), state["backbone"].values()))


# ---------------------------------------------------------------------------------------------- training
# 24 images / batch 4 = 6 steps per epoch, 12 in all; the Gram teacher taken before step 2 at 2x the global
# size (64 px for 32), the weight ramping over steps 2-4, refreshed after steps 2 and 5 (then max_updates)
GRAM_RUN = ["gram.weight=1", "gram.it_load_ema_teacher=2", "gram.start_step=2", "gram.ramp_steps=3",
            "data.crops.gram_size=64", "gram.update_frequency=3", "gram.max_updates=2", "gram.dino_local_weight=0.5",
            "ibot.weight=1", "masking.shape=block", "gram.compute_stats=true"]


@pytest.fixture(scope="module")
def gram_data(tmp_path_factory):
    from test_end_to_end import make_folder

    return make_folder(tmp_path_factory.mktemp("gram") / "train", 12, 0)


def _run(data, out, extra, stop_at=None):
    from ssl_distill.engine.train import train
    from test_end_to_end import tiny_overrides

    stop = [] if stop_at is None else [f"run.stop_at_step={stop_at}"]
    return train(load_config(CONFIG, tiny_overrides(data, out) + ["run.log_every=1", *extra, *stop]))


def _records(out):
    import json

    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_with_a_frozen_gram_teacher_resumes_across_a_refresh_bit_identically(gram_data, tmp_path):
    from ssl_distill.checkpoints import load_file

    full, part = tmp_path / "full", tmp_path / "part"
    _run(gram_data, full, GRAM_RUN)
    _run(gram_data, part, GRAM_RUN, stop_at=4)  # between the first refresh (after step 2) and the second (after 5)
    assert load_file(part / "checkpoint.pth")["gram"]["refreshes"] == 1
    _run(gram_data, part, [*GRAM_RUN, "data.num_workers=1"])  # the Gram crops made in a loader worker this time
    a, b = load_file(full / "checkpoint.pth"), load_file(part / "checkpoint.pth")
    assert a["step"] == b["step"] == 12
    assert a["gram"]["ready"] and a["gram"]["refreshes"] == b["gram"]["refreshes"] == 2
    for part_name in ("student", "teacher"):
        for key in a[part_name]:
            assert torch.equal(a[part_name][key], b[part_name][key]), (part_name, key)
    for key in a["gram"]["backbone"]:
        assert torch.equal(a["gram"]["backbone"][key], b["gram"]["backbone"][key]), key
    # the log: the same values step by step (wall-clock aside), the Gram teacher's events, the monitors
    timeless = [[{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in _records(o)
                 if r.get("kind") != "config_change"] for o in (full, part)]
    assert timeless[0] == timeless[1]
    changes = [r for r in _records(part) if r.get("kind") == "config_change"]  # the resume's accepted change
    assert len(changes) == 1 and "data.num_workers" in changes[0]["changes"]
    events = [(r["step"], r["event"], r["refreshes"]) for r in _records(full) if r.get("kind") == "gram_teacher"]
    assert events == [(2, "snapshot", 0), (2, "refresh", 1), (5, "refresh", 2)]
    train_records = [r for r in _records(full) if "kind" not in r]
    by_step = {r["step"]: r for r in train_records}
    assert "gram" not in by_step[3] and by_step[3]["gram_weight"] == 0.0  # step 2: the ramp's first value is 0
    assert by_step[4]["gram_weight"] == 0.5 and by_step[4]["dino_local_weight"] == 0.75
    assert by_step[12]["gram_weight"] == 1.0 and by_step[12]["dino_local_weight"] == 0.5
    for r in train_records:
        assert 0 < r["gram_student_patch_sim"] < 1  # logged from the first step on
    for r in train_records[3:]:
        assert r["gram"] > 0 and 0 < r["gram_teacher_patch_sim"] < 1 and "gram_masked" in r


@pytest.mark.slow
def test_the_live_ema_teacher_needs_no_model_and_logs_the_monitor(gram_data, tmp_path):
    from ssl_distill.checkpoints import load_file
    from ssl_distill.engine.train import Trainer
    from test_end_to_end import tiny_overrides

    trainer = Trainer(load_config(CONFIG, tiny_overrides(gram_data, tmp_path / "t") + LIVE))
    assert trainer.gram is None and trainer.reads.teacher == ("cls", "patch_global")
    last = _run(gram_data, tmp_path / "live", [*LIVE, "optim.epochs=1"])
    assert last["step"] == 6 and last["gram"] > 0 and "gram" not in load_file(tmp_path / "live" / "checkpoint.pth")
    # at the first step student and teacher are the same network on the same views: the same Gram matrices
    first = _records(tmp_path / "live")[0]
    assert first["gram"] < 1e-3 and abs(first["gram_student_patch_sim"] - first["gram_teacher_patch_sim"]) < 1e-2


@pytest.mark.slow
def test_a_gram_teacher_file_is_loaded_or_refused_naming_the_keys(gram_data, tmp_path):
    from ssl_distill.checkpoints import CheckpointError, load_file
    from ssl_distill.engine.train import Trainer
    from test_end_to_end import tiny_overrides

    source = tmp_path / "source"
    _run(gram_data, source, ["optim.epochs=1"])
    teacher = load_file(source / "checkpoint.pth")["teacher"]
    from_file = ["gram.weight=1", f"gram.ckpt={source}", "data.crops.gram_size=32"]
    trainer = Trainer(load_config(CONFIG, tiny_overrides(gram_data, tmp_path / "g") + from_file))
    assert trainer.gram.ready
    for key, value in trainer.gram.backbone.state_dict().items():
        assert torch.equal(value, teacher[f"backbone.{key}"]), key
    deeper = tiny_overrides(gram_data, tmp_path / "deeper") + from_file + ["model.depth=3"]
    with pytest.raises(CheckpointError, match=r"gram.ckpt=.*missing keys \['vit\.blocks\.2.*this run's architecture"):
        Trainer(load_config(CONFIG, deeper))
    assert not (tmp_path / "deeper").exists()


@pytest.mark.slow
def test_gram_added_to_a_resumed_run_takes_its_teacher_now_or_is_refused(gram_data, tmp_path):
    from ssl_distill.checkpoints import load_file

    out = tmp_path / "run"
    _run(gram_data, out, [], stop_at=4)
    late = ["gram.weight=1", "data.crops.gram_size=64"]
    with pytest.raises(ConfigError, match="resumes at step 4 without one"):
        _run(gram_data, out, [*late, "gram.it_load_ema_teacher=3", "gram.start_step=3"])
    _run(gram_data, out, [*late, "gram.it_load_ema_teacher=4", "gram.start_step=4"])
    assert load_file(out / "checkpoint.pth")["gram"]["ready"]
    assert [r["step"] for r in _records(out) if r.get("kind") == "gram_teacher"] == [4]


@pytest.mark.slow
def test_the_report_draws_the_gram_monitors(gram_data, tmp_path):
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    from ssl_distill.report import read_run, write_report
    from ssl_distill.report.figure import _gram

    gram, plain = tmp_path / "gram", tmp_path / "plain"
    _run(gram_data, gram, ["gram.weight=1", "gram.it_load_ema_teacher=2", "gram.start_step=2",
                           "data.crops.gram_size=64", "optim.epochs=1"])
    _run(gram_data, plain, ["optim.epochs=1"])
    runs = [read_run(gram), read_run(plain)]
    assert runs[0].loss_terms() == ["loss", "dino", "gram"]  # the monitors and weights are not loss terms
    legend = [name for name, _ in _gram(Figure().add_subplot(), runs, ["C0", "C1"], "step", 1.0)]
    assert legend == ["student patches", "Gram teacher patches", "Gram weight (right axis)"]
    with_gram = imread(write_report([gram, plain], out=tmp_path / "both.png").figure)
    without = imread(write_report([plain], out=tmp_path / "plain.png").figure)
    assert with_gram.shape[0] > without.shape[0]  # one row more: Gram anchoring


def test_gram_crops_are_rendered_from_the_epoch_of_the_gram_terms_first_step(gram_data, tmp_path):
    """Before the epoch of gram.start_step no step reads the Gram crops: the loader leaves them out (a 448-px
    crop pair per image, 83% of the DINOv3 recipe's run), the views stay those of a loader that renders them,
    and from that epoch on the batches carry the same Gram crops; a run trains through the start."""
    from ssl_distill.data.loader import build_train_loader
    from ssl_distill.engine.train import Trainer
    from test_end_to_end import tiny_overrides

    late = [*GRAM_RUN, "gram.start_step=7", "gram.it_load_ema_teacher=7", "gram.it_first_update=0",
            "gram.update_frequency=0", "gram.max_updates=null"]  # 6 steps an epoch: the term starts in epoch 1
    cfg = load_config(CONFIG, tiny_overrides(gram_data, tmp_path / "late") + late)
    skipping, sampler = build_train_loader(cfg, None, gram_from_step=7)
    always, always_sampler = build_train_loader(cfg, None, gram_from_step=0)
    assert sampler.batches_per_epoch == 6
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        always_sampler.set_epoch(epoch)
        for ours, full in zip(skipping, always):
            assert ("gram_crops" in ours) == (epoch == 1)
            for a, b in zip(ours["crops"] + ours.get("gram_crops", []), full["crops"] + full.get("gram_crops", [])):
                assert torch.equal(a, b)
            assert all(torch.equal(a, b) for a, b in zip(ours["masks"], full["masks"]))
    never, _ = build_train_loader(cfg, None, gram_from_step=None)  # a run whose Gram weight is 0
    assert "gram_crops" not in next(iter(never))
    assert Trainer(cfg).loader.dataset.transform.gram_from_epoch == 1
    _run(gram_data, tmp_path / "late", late)
    records = {r["step"]: r for r in _records(tmp_path / "late") if "kind" not in r}
    assert "gram" not in records[7] and records[9]["gram"] > 0 and records[12]["gram"] > 0


def test_the_gram_teacher_runs_the_fused_attention_kernel_with_the_plain_paths_features(gram_data, tmp_path):
    """Forward only, the Gram teacher takes the fused kernel whatever model.fused_attn says (the plain path is
    the CPU's choice for its backward); its patch features are the plain path's up to float rounding."""
    from ssl_distill.engine.train import Trainer
    from test_end_to_end import tiny_overrides

    trainer = Trainer(load_config(CONFIG, tiny_overrides(gram_data, tmp_path / "f") + [*FROZEN, "model.fused_attn=false"]))
    gram = trainer.gram
    assert all(blk.attn.fused_attn for blk in gram.backbone.vit.blocks)
    assert not any(blk.attn.fused_attn for blk in trainer.teacher.backbone.vit.blocks)
    gram.before_step(0, trainer.teacher.backbone)
    crops = [torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fused = gram.patches(crops)
    gram.backbone.set_fused_attn(False)
    torch.testing.assert_close(fused, gram.patches(crops), rtol=1e-4, atol=1e-5)
