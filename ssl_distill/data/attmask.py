"""AttMask: attention-guided token masking for masked image modeling.

Kakogeorgiou et al., "What to Hide from Your Students: Attention-Guided Masked Image Modeling",
ECCV 2022, Sec. 3. The teacher's last-block [CLS] -> patch attention, averaged over heads,
ranks the N patches of each global crop; the student is then asked to reconstruct (iBOT-style)

* ``high`` (AttMask-High): the ``int(N * r)`` most attended patches,
* ``low`` (AttMask-Low): the ``int(N * r)`` least attended patches,
* ``hint`` (AttMask-Hint): the AttMask-High mask, then ``int(show_max * r' * N)`` patches drawn
  uniformly without replacement from the ``int(N * show_max)`` most attended ones are revealed.

Semantics follow the authors' code (``attmask.py`` and ``main_attmask.py``):

* counts use Python's ``int`` (truncation) of the float product, in the same operand order as the
  official code, so ``int(100 * 0.29) == 28``;
* each row is masked at all only with probability ``masking_prob``: one uniform ``u`` per row,
  and rows with ``u > masking_prob`` get an all-False mask (the others keep their mask). The rows
  are the global crops of every image, so the two crops of one image are decided independently;
* one ratio ``r`` serves the whole batch (:func:`draw_batch_ratio`, iBOT's ``get_pred_ratio``);
  the official training loop calls ``get_pred_ratio()`` a *second* time for the number of hints,
  so ``r'`` is an independent draw; pass it as ``hint_ratio`` to reproduce that (default: ``r``);
* the revealed patches come from the top ``int(N * show_max)`` of the attention ranking whatever
  the mask is: a row that the ``masking_prob`` draw left unmasked stays unmasked, and when
  ``r < show_max`` some drawn patches may not have been masked, so fewer are actually revealed.
  For ``r >= show_max`` on a masked row exactly ``int(show_max * r' * N)`` patches are revealed;
* ties in the attention are broken by the lower patch index first (a stable sort); the official
  ``torch.argsort`` is not stable, so tied patches may be ranked differently there;
* random draws happen in the official order (row uniforms, then for ``hint`` a second, unused row
  of uniforms that the official code draws for the top set with ``masking_prob=1``, then the
  multinomial), so for tie-free attention the same generator state gives the official masks.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

Strategy = Literal["high", "low", "hint"]
STRATEGIES: tuple[str, ...] = ("high", "low", "hint")


def draw_batch_ratio(
    pred_ratio: Sequence[float] | float,
    pred_ratio_var: Sequence[float] | float,
    generator: torch.Generator | None = None,
) -> float:
    """One masking ratio for a batch, iBOT's ``ImageFolderMask.get_pred_ratio`` (used by AttMask).

    With ``pred_ratio = [m_1..m_L]`` and ``pred_ratio_var = [v_1..v_L]`` (a single variance is used
    for every entry), one entry ``i`` is chosen uniformly and ``r ~ U(m_i - v_i, m_i + v_i)``, or
    ``r = m_i`` when ``v_i == 0``. The official code draws a uniform for every entry and then
    picks one; drawing the index first gives the same distribution with fewer draws. The AttMask
    recipes use ``pred_ratio=0.3, pred_ratio_var=0.2``, i.e. ``r ~ U(0.1, 0.5)``.

    Args:
        pred_ratio: mean ratio(s) m_i, each in [0, 1].
        pred_ratio_var: half-width(s) v_i of the uniform, ``0 <= v_i <= m_i``; length 1 or L.
        generator: source of the random draws (torch's default generator when None).
    Returns:
        r as a Python float.
    """
    means = [float(pred_ratio)] if isinstance(pred_ratio, (int, float)) else [float(m) for m in pred_ratio]
    halfs = [float(pred_ratio_var)] if isinstance(pred_ratio_var, (int, float)) else [float(v) for v in pred_ratio_var]
    if not means:
        raise ValueError("pred_ratio needs at least one value")
    if len(halfs) == 1:
        halfs = halfs * len(means)
    if len(halfs) != len(means):
        raise ValueError(f"pred_ratio_var has {len(halfs)} values, pred_ratio {len(means)}: give 1 or as many")
    for m, v in zip(means, halfs):
        if not 0.0 <= v <= m:
            raise ValueError(f"need 0 <= pred_ratio_var <= pred_ratio, got var {v} for ratio {m}")
        if m + v > 1.0:
            raise ValueError(f"pred_ratio + pred_ratio_var must not exceed 1, got {m} + {v}")
    i = 0
    if len(means) > 1:
        i = int(torch.randint(len(means), (1,), generator=generator).item())
    m, v = means[i], halfs[i]
    if v == 0.0:
        return m
    u = float(torch.rand(1, dtype=torch.float64, generator=generator).item())
    return (m - v) + 2.0 * v * u


def rank_mask(attn: torch.Tensor, count: int, most_attended: bool = True) -> torch.Tensor:
    """Mask of the ``count`` most (or least) attended patches of each row.

    Args:
        attn: (B, N) attention scores.
        count: patches to select per row, 0 <= count <= N.
        most_attended: True for the largest scores, False for the smallest.
    Returns:
        (B, N) bool, True on the selected patches; ties go to the lower patch index.
    """
    order = torch.argsort(attn, dim=1, descending=most_attended, stable=True)
    mask = torch.zeros(attn.shape, dtype=torch.bool, device=attn.device)
    return mask.scatter_(1, order[:, :count], True)


def attmask(
    attn: torch.Tensor,
    ratio: float,
    strategy: Strategy = "high",
    *,
    masking_prob: float = 0.5,
    generator: torch.Generator | None = None,
    show_max: float = 0.1,
    hint_ratio: float | None = None,
) -> torch.Tensor:
    """AttMask-High / -Low / -Hint masks from the teacher's [CLS] attention (ECCV 2022, Sec. 3).

    Args:
        attn: (B, N) teacher last-block [CLS] -> patch attention averaged over heads, no prefix
            tokens (the official code takes ``attn[:, :, 0, 1:].mean(1)`` over all global crops,
            crop-major, and chunks the (B, N) result per crop afterwards).
        ratio: r in [0, 1], one per batch (:func:`draw_batch_ratio`); ``int(N * r)`` are masked.
        strategy: ``"high"``, ``"low"`` or ``"hint"``.
        masking_prob: probability that a row is masked at all (0.5 in the paper).
        generator: source of every random draw; its device is used for the draws (torch's
            default generator on ``attn``'s device when None).
        show_max: fraction of the most attended patches the hints are drawn from (0.1).
        hint_ratio: r' in the hint count ``int(show_max * r' * N)``; None uses ``ratio``. The
            official loop draws r' independently of r (a second ``get_pred_ratio()`` call).
    Returns:
        (B, N) bool, True = masked (replaced by the mask token in the student).
    """
    if attn.dim() != 2:
        raise ValueError(f"attn must be (B, N), got shape {tuple(attn.shape)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    for name, value in (("ratio", ratio), ("masking_prob", masking_prob), ("show_max", show_max)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if hint_ratio is None:
        hint_ratio = ratio
    elif not 0.0 <= hint_ratio <= 1.0:
        raise ValueError(f"hint_ratio must be in [0, 1], got {hint_ratio}")
    b, n = attn.shape
    draw_device = generator.device if generator is not None else attn.device

    mask = rank_mask(attn, int(n * ratio), most_attended=strategy != "low")
    keep = torch.rand(b, generator=generator, device=draw_device) <= masking_prob
    mask &= keep.to(attn.device).unsqueeze(1)

    if strategy == "hint":
        top = rank_mask(attn, int(n * show_max), most_attended=True)
        # The official code builds the top set with its masking function at masking_prob=1, which
        # draws (and ignores) one uniform per row; drawing it too keeps the random streams aligned.
        torch.rand(b, generator=generator, device=draw_device)
        n_reveal = int(show_max * hint_ratio * n)
        if n_reveal > 0:  # torch.multinomial refuses 0 samples (the official code would raise)
            revealed = torch.multinomial(top.to(draw_device).float(), n_reveal, generator=generator)
            mask.scatter_(1, revealed.to(attn.device), False)
    return mask

