"""KoLeo regulariser (Sablayrolles et al., ICLR 2019; DINOv2): a hand-computed circle, equality with a
literal re-implementation of DINOv2's KoLeoLoss (values and gradients), DINOv2's per-crop use,
finite gradients when two rows coincide, and the term in a training step without DINO's [CLS] term: on the
iBOT, ODIS and DINOv2-style (shared head) recipes it trains; with DINOv2's separate head it is refused at config
time, with no run directory left behind."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_distill.cli import run as cli
from ssl_distill.config import load_config
from ssl_distill.engine.train import Trainer, train
from ssl_distill.objectives.koleo import KoLeoLoss, koleo_loss, koleo_loss_per_crop, nearest_neighbours

from scenes import make_scenes, write_coco
from test_end_to_end import CONFIG, ROOT, make_folder, tiny_overrides

# iBOT's patch term with KoLeo and without DINO's [CLS] term: no objective reads the [CLS] logits
IBOT_KOLEO = ["ibot.weight=1", "masking.shape=block", "masking.pred_ratio=[0,0.3]", "masking.pred_ratio_var=[0,0.2]",
              "dino.weight=0", "dino.koleo_weight=0.1"]


class OfficialKoLeoLoss(nn.Module):
    """DINOv2's KoLeoLoss, rewritten literally (its cuda autocast guard as a CPU one)."""

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x):
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)
        _, I = torch.max(dots, dim=1)  # noqa: E741
        return I

    def forward(self, student_output, eps=1e-8):
        with torch.autocast("cpu", enabled=False):
            student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
            I = self.pairwise_NNs_inner(student_output)  # noqa: E741
            distances = self.pdist(student_output, student_output[I])
            return -torch.log(distances + eps).mean()


def circle(angles_deg: list[float], radius: float = 1.0) -> torch.Tensor:
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return radius * torch.stack([a.cos(), a.sin()], dim=1)


@pytest.mark.parametrize("radius", [1.0, 0.01, 250.0])
def test_hand_computed_circle(radius):
    # unit vectors at 0, 60 and 180 degrees: inner products 0.5 (0-60), -1 (0-180), -0.5 (60-180);
    # nearest neighbours 0 -> 60, 60 -> 0, 180 -> 60; chord lengths 1, 1, sqrt(3).
    # loss = -(log 1 + log 1 + log sqrt 3) / 3 = -ln(3) / 6, whatever the radius (rows are normalised)
    x = circle([0.0, 60.0, 180.0], radius)
    assert nearest_neighbours(F.normalize(x, dim=-1)).tolist() == [1, 0, 1]
    assert koleo_loss(x).item() == pytest.approx(-math.log(3) / 6, abs=1e-7)


def test_nearest_neighbour_ignores_the_row_itself():
    x = F.normalize(torch.randn(9, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    nn_index = nearest_neighbours(x)
    assert (nn_index != torch.arange(9)).all()
    brute = [max((j for j in range(9) if j != i), key=lambda j: float(x[i] @ x[j])) for i in range(9)]
    assert nn_index.tolist() == brute


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_the_official_code_values_and_gradients(dtype):
    base = torch.randn(32, 16, generator=torch.Generator().manual_seed(1), dtype=dtype) * 3
    ours_in = base.clone().requires_grad_()
    theirs_in = base.clone().requires_grad_()
    ours = koleo_loss(ours_in)
    theirs = OfficialKoLeoLoss()(theirs_in)
    assert torch.equal(ours, theirs)
    ours.backward()
    theirs.backward()
    assert torch.equal(ours_in.grad, theirs_in.grad)


def test_per_crop_sum_is_dinov2s_use():
    tokens = torch.randn(2 * 12, 16, generator=torch.Generator().manual_seed(2))
    official = OfficialKoLeoLoss()
    expected = sum(official(p) for p in tokens.chunk(2))
    assert torch.equal(koleo_loss_per_crop(tokens, n_crops=2), expected)
    assert torch.equal(KoLeoLoss(n_crops=2)(tokens), expected)
    assert torch.equal(KoLeoLoss(n_crops=1)(tokens), koleo_loss(tokens))


def test_per_crop_never_pairs_the_two_crops_of_one_image():
    # identical crops of the same images: across crops every row has a copy at distance ~0,
    # within a crop the neighbours are other images
    crop = torch.randn(10, 8, generator=torch.Generator().manual_seed(3))
    tokens = torch.cat([crop, crop])
    per_crop = koleo_loss_per_crop(tokens, n_crops=2)
    assert torch.allclose(per_crop, 2 * koleo_loss(crop))
    assert koleo_loss(tokens) > 15  # -log(sqrt(8) * 1e-8 + 1e-8) = 17.1 for every row


def test_coinciding_rows_give_finite_loss_and_gradients():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    x[1] = x[0]
    x.requires_grad_()
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    # rows 0 and 1 are each other's neighbour at distance ||1e-8 * ones(4)|| = 2e-8
    # (the other 4 rows contribute -log(d + eps) >= -log(2 + eps) each)
    lower_bound = (2 * -math.log(2e-8 + 1e-8) - 4 * math.log(2 + 1e-8)) / 6
    assert loss.item() >= lower_bound - 1e-5


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        koleo_loss(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="equal crops"):
        koleo_loss_per_crop(torch.randn(5, 4), n_crops=2)


# ---------------------------------------------------------------- in the training step
@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("koleo") / "train", 12, 0)


def literal_koleo(x: torch.Tensor) -> torch.Tensor:
    """-1/B sum_i log(min_{j != i} ||x_i - x_j|| + 1e-8) over L2-normalised rows, in float64."""
    x = F.normalize(x.double(), dim=-1)
    distances = torch.cdist(x, x)
    distances.fill_diagonal_(math.inf)
    return -torch.log(distances.min(dim=1).values + 1e-8).mean()


def test_without_the_cls_term_koleo_is_the_formula_on_the_students_global_cls_features(train_dir, tmp_path):
    trainer = Trainer(load_config(CONFIG, tiny_overrides(train_dir, tmp_path / "run") + IBOT_KOLEO))
    outputs = {}
    trainer.student.register_forward_hook(lambda module, args, out: outputs.update(student=out))
    trainer.teacher.register_forward_hook(lambda module, args, out: outputs.update(teacher=out))
    trainer.sampler.set_epoch(0)
    crops, *masks = trainer.step_inputs(next(iter(trainer.loader)))
    record = trainer.train_step(crops, 0, *masks)
    assert "cls" not in outputs["student"] and "cls" not in outputs["teacher"]  # nothing reads the [CLS] logits
    g, b = trainer.n_global, crops[0].shape[0]
    global_features = outputs["student"]["cls_feat"][: g * b].detach()  # crop-major, the global views first
    expected = sum(literal_koleo(crop) for crop in global_features.chunk(g))
    assert record["koleo"] == pytest.approx(float(expected), rel=1e-5)
    assert record["loss"] == pytest.approx(record["patch"] + 0.1 * record["koleo"], rel=1e-6)


def test_ibot_with_koleo_and_without_the_cls_term_trains_and_logs_a_finite_koleo_term(train_dir, tmp_path):
    out = tmp_path / "run"
    assert train(load_config(CONFIG, tiny_overrides(train_dir, out) + IBOT_KOLEO + ["run.stop_at_step=2"]))["step"] == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log and all(math.isfinite(r["koleo"]) and r["koleo"] != 0 for r in log)
    assert "dino" not in log[-1] and "teacher_entropy" not in log[-1]


# ---------------------------------------------------------------- the recipes without the [CLS] term
KOLEO_ONLY = ["dino.weight=0", "dino.koleo_weight=0.1"]


@pytest.fixture(scope="module")
def scene_folder(tmp_path_factory):
    """Eight 64 x 64 scenes with one object each: (image folder, COCO boxes file)."""
    return write_coco(tmp_path_factory.mktemp("koleo_scenes"), make_scenes(8, seed=0, size=64))


@pytest.mark.parametrize("recipe, extra", [
    ("ibot_tiny_fmnist.yaml", []),
    ("odis_tiny_scenes.yaml", None),  # its images and boxes: the scene folder
    ("dinov2_style_tiny_fmnist.yaml", ["ibot.shared_head=true"]),
], ids=["ibot", "odis", "dinov2_shared_head"])
def test_koleo_without_the_cls_term_trains_on_the_masked_recipes(recipe, extra, train_dir, scene_folder, tmp_path):
    """``dino.weight=0 dino.koleo_weight=0.1`` used to fail at the first step (KeyError: 'cls') and leave a
    run directory behind: KoLeo reads the backbone's [CLS] features, which every step builds."""
    images, boxes = scene_folder
    folder, extra = (images, [f"data.boxes={boxes}"]) if extra is None else (train_dir, extra)
    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / recipe, tiny_overrides(folder, out) + extra + KOLEO_ONLY +
                      ["run.stop_at_step=2", "run.log_every=1"])
    assert train(cfg)["step"] == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "kind" not in r]
    assert len(steps) == 2 and all(math.isfinite(r["koleo"]) and r["koleo"] != 0 for r in steps)
    assert all("dino" not in r and "teacher_entropy" not in r for r in steps)  # no [CLS] term, no [CLS] teacher


def test_koleo_without_the_cls_term_and_a_separate_patch_head_is_refused_leaving_no_run(train_dir, tmp_path,
                                                                                      capsys):
    """DINOv2's separate patch head leaves the [CLS] head nothing to learn without the [CLS] term: refused
    before anything is written."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli(["train", str(ROOT / "configs" / "dinov2_style_tiny_fmnist.yaml"),
             *tiny_overrides(train_dir, out), *KOLEO_ONLY])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("config error: ") and "ibot.shared_head=false" in err
    assert not out.exists()
