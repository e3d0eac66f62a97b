"""A real ``Trainer`` step of the masked-image objectives against the step written here from iBOT's and
AttMask's rules (Zhou et al. 2022, Sec. 3.2 and ``main_ibot.py``; Kakogeorgiou et al. 2022, Sec. 3.2):

- the teacher runs once per step, on the global views only, unmasked: its [CLS] and patch targets, and
  (AttMask) the last block's [CLS] attention the masks are ranked by, all come from that one forward;
- the masks: iBOT's come with the batch; AttMask's are the attention's top patches (``attmask`` with the
  step's generator, tested against the official code in test_attmask.py) of that same teacher forward;
- the student sees the global views with the mask token in place of the patch embedding at exactly the
  masked patches (before the position embedding) and the local views as they are, never masked;
- the patch term reads the student's patch logits at the masked positions only: per image the mean over
  its masked patches of H(softmax((t - c) / tau_pt), softmax(s / tau_s)), then the mean over the global
  views of all images; the [CLS] term is DINO's over all pairs of different views.

What the step ran is watched through the input of each network's first block (one call per forward);
everything the reference computes goes through the ViT's own layers (patch embedding, position
embedding, blocks, heads), not through the package's wrappers. A step whose teacher receives the
masked views fails these checks (the last test). ``local_size == global_size`` is covered: a local view
of the global size is still never masked.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ssl_distill.config import load_config
from ssl_distill.data.attmask import attmask, draw_batch_ratio
from ssl_distill.engine.train import Trainer

from test_end_to_end import CONFIG, make_folder, tiny_overrides

N_GLOBAL, BATCH = 2, 4
RECIPES = {
    "ibot": ["ibot.weight=1", "masking.shape=block", "masking.pred_ratio=[0.3]", "masking.pred_ratio_var=[0.2]"],
    "attmask": ["ibot.weight=1", "masking.attmask=high", "masking.pred_ratio=[0.3]", "masking.pred_ratio_var=[0.2]",
                "masking.masking_prob=0.5"],
}
CASES = [("ibot", 16), ("attmask", 16), ("ibot", 32), ("attmask", 32)]  # local_size 32 = global_size
IDS = [f"{name}-local{size}" for name, size in CASES]


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("masked_step") / "train", 6, 0)


def build_trainer(train_dir, out, recipe: str, local_size: int) -> Trainer:
    overrides = tiny_overrides(train_dir, out) + RECIPES[recipe] + [
        "run.precision=fp32", "model.drop_path_rate=0", "model.use_bn_in_head=false",  # no batch statistics
        "model.embed_dim=48", "model.num_heads=3",
        f"data.batch_size={BATCH}", f"data.crops.n_global={N_GLOBAL}", f"data.crops.local_size={local_size}"]
    trainer = Trainer(load_config(CONFIG, overrides))
    with torch.no_grad():  # a mask token unlike zero and unlike any patch embedding, in both networks
        token = torch.randn(trainer.student.backbone.masked_embed.shape, generator=torch.Generator().manual_seed(0))
        trainer.student.backbone.masked_embed.copy_(token)
        trainer.teacher.backbone.masked_embed.copy_(token)
    return trainer


# ------------------------------------------------------------------ the step, written here
def first_block_input(backbone, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[CLS] + patch tokens entering the first block; ``mask`` (B, P): the mask token replaces the patch
    embedding there, before the position embedding is added."""
    vit = backbone.vit
    h = vit.patch_embed(x)  # (B, h, w, D)
    if mask is not None:
        h = torch.where(mask.view(*h.shape[:-1], 1), backbone.masked_embed, h)
    return vit.norm_pre(vit._pos_embed(h))


def encode(backbone, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens after the final norm (B, 1 + P, D), the last block's [CLS] -> patch attention (B, P), mean
    over heads)."""
    vit = backbone.vit
    h = first_block_input(backbone, x, mask)
    for block in vit.blocks[:-1]:
        h = block(h)
    attn = vit.blocks[-1].attn
    b, t, _ = h.shape
    qkv = attn.qkv(vit.blocks[-1].norm1(h)).view(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    weights = ((qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale).softmax(-1)  # (B, heads, T, T)
    return vit.norm(vit.blocks[-1](h)), weights[:, :, 0, 1:].mean(1)


def cross_view_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, n_views: int) -> torch.Tensor:
    """DINO's loss: H(teacher view i, student view v) averaged over the pairs of different views."""
    s = F.log_softmax(student_logits / 0.1, dim=-1).chunk(n_views)
    t = teacher_probs.chunk(N_GLOBAL)
    pairs = [-(t[i] * s[v]).sum(-1).mean() for i in range(N_GLOBAL) for v in range(n_views) if v != i]
    return sum(pairs) / len(pairs)


def reference_step(trainer: Trainer, student, teacher, centers: dict, crops, data_masks, record: dict) -> dict:
    """The step from the rules above on copies of the networks taken before the real step."""
    globals_, locals_ = torch.cat(crops[:N_GLOBAL]), torch.cat(crops[N_GLOBAL:])
    with torch.no_grad():
        t_tokens, attention = encode(teacher.backbone, globals_)  # unmasked, once
        if trainer.masks.needs_attention:  # AttMask: from this forward's attention, with the step's draws
            g = trainer.masks.generator(0)
            m = trainer.cfg.masking
            masks = attmask(attention, draw_batch_ratio(m.pred_ratio, m.pred_ratio_var, g), m.attmask,
                            masking_prob=m.masking_prob, generator=g)
        else:
            masks = torch.cat(data_masks)
        t_cls = F.softmax((teacher.head(t_tokens[:, 0]) - centers["center"]) / record["teacher_temp"], dim=-1)
        t_patch = F.softmax((teacher.head(t_tokens[:, 1:]) - centers["patch_center"]) / record["patch_teacher_temp"],
                            dim=-1)  # every patch's target; the term reads the masked ones
        s_global, _ = encode(student.backbone, globals_, masks)
        s_local, _ = encode(student.backbone, locals_)
        s_cls = student.head(torch.cat([s_global[:, 0], s_local[:, 0]]))
        s_patch_rows = s_global[:, 1:][masks]  # the student's masked positions, nothing else
        log_p = F.log_softmax(student.head(s_patch_rows) / 0.1, dim=-1)
        per_patch = -(t_patch[masks] * log_p).sum(-1)
        per_image = torch.stack([per_patch[masks.nonzero()[:, 0] == i].sum() / max(int(masks[i].sum()), 1)
                                 for i in range(len(masks))])
    return {"masks": masks, "dino": float(cross_view_loss(s_cls, t_cls, len(crops))), "patch": float(per_image.mean()),
            "teacher_in": first_block_input(teacher.backbone, globals_),
            "student_in": [first_block_input(student.backbone, globals_, masks),
                           first_block_input(student.backbone, locals_)],
            "unmasked_global_in": first_block_input(student.backbone, globals_), "patch_rows": s_patch_rows}


# ------------------------------------------------------------------ the check
def run_and_check(trainer: Trainer) -> None:
    """One real step, watched, against :func:`reference_step`; AssertionError names the broken rule."""
    trainer.sampler.set_epoch(0)
    crops, data_masks, *_ = trainer.step_inputs(next(iter(trainer.loader)))
    student, teacher = copy.deepcopy(trainer.student), copy.deepcopy(trainer.teacher)  # before any hook
    centers = {name.split(".")[-1]: b.clone() for name, b in trainer.objectives.named_buffers()}
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": [], "patch_head": []}
    hooks = [net.backbone.vit.blocks[0].register_forward_pre_hook(
        lambda _, args, kwargs, who=who: seen[who].append(args[0].detach().clone()), with_kwargs=True)
        for who, net in (("teacher", trainer.teacher), ("student", trainer.student))]
    hooks.append(trainer.student.head.register_forward_pre_hook(
        lambda _, args: seen["patch_head"].append(args[0].detach().clone())))
    try:
        record = trainer.train_step(crops, 0, data_masks)
    finally:
        for hook in hooks:
            hook.remove()
    ref = reference_step(trainer, student, teacher, centers, crops, data_masks, record)
    masks = ref["masks"]
    assert 0 < masks.sum() < masks.numel(), "the step should mask some patches and not others"

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    assert len(seen["teacher"]) == 1, f"the teacher ran {len(seen['teacher'])} forwards in one step, not one"
    assert close(seen["teacher"][0], ref["teacher_in"]), "the teacher did not see the unmasked global views"
    assert len(seen["student"]) == 2, f"the student ran {len(seen['student'])} forwards, not globals + locals"
    global_in, local_in = seen["student"]
    changed = ~torch.isclose(global_in[:, 1:], ref["unmasked_global_in"][:, 1:], rtol=1e-5, atol=1e-6).all(-1)
    assert torch.equal(changed, masks), "the student's global views are not masked at exactly the step's masks"
    assert close(global_in, ref["student_in"][0]), "the student's masked global views differ from the rule"
    assert close(local_in, ref["student_in"][1]), "the student's local views were masked or altered"
    assert any(close(rows, ref["patch_rows"]) for rows in seen["patch_head"]), \
        "the patch head did not read the student's masked positions (and only those)"
    assert record["dino"] == pytest.approx(ref["dino"], rel=1e-5), "the [CLS] term differs from the rule"
    assert record["patch"] == pytest.approx(ref["patch"], rel=1e-5), "the patch term differs from the rule"
    assert record["loss"] == pytest.approx(ref["dino"] + ref["patch"], rel=1e-5)
    assert record["mask_ratio"] == pytest.approx(float(masks.float().mean()))


@pytest.mark.parametrize("recipe, local_size", CASES, ids=IDS)
def test_a_masked_step_follows_the_masking_rules(train_dir, tmp_path, recipe, local_size):
    run_and_check(build_trainer(train_dir, tmp_path / "run", recipe, local_size))


@pytest.mark.parametrize("recipe", ["ibot", "attmask"])
def test_a_step_whose_teacher_sees_the_masked_views_fails_the_check(train_dir, tmp_path, recipe):
    """The check is not vacuous: a teacher given the step's masks is caught (iBOT's come from the batch;
    for AttMask a first forward makes them and a second runs on the masked views)."""
    trainer = build_trainer(train_dir, tmp_path / "run", recipe, 16)
    forward = trainer.teacher.forward

    def masked_teacher(crops, **kwargs):
        if trainer.masks.needs_attention:  # the masks this attention gives, then the forward on masked views
            step_masks = trainer.masks.build(None, forward(crops, **kwargs), trainer.step_state(0))[0]
        else:
            trainer.sampler.set_epoch(0)
            step_masks = torch.cat(trainer.step_inputs(next(iter(trainer.loader)))[1])
        return forward(crops, masks=step_masks, **kwargs)

    trainer.teacher.forward = masked_teacher
    with pytest.raises(AssertionError, match="the teacher"):
        run_and_check(trainer)
