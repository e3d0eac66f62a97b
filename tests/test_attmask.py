"""AttMask masks (Kakogeorgiou et al., ECCV 2022): exact top / bottom sets, the hint reveal, the
per-row masking probability, generator determinism, the batch ratio draw, and equality with a
literal re-implementation of the authors' attmask.py on identical tensors and random streams."""
from __future__ import annotations

import random

import pytest
import torch

from ssl_distill.data.attmask import attmask, draw_batch_ratio, rank_mask


def distinct_attention(b: int, n: int, seed: int = 0) -> torch.Tensor:
    """(b, n) attention-like rows without ties: a random permutation of n distinct values per row,
    normalised to sum to 1."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(n, generator=g) for _ in range(b)]).float() + 1.0
    return rows / rows.sum(1, keepdim=True)


# ---------------------------------------------------------------- literal official re-implementation
def official_attmask(attention, masking_prob, masking_mode, masking_ratio, show_ratio, show_max):
    """The authors' attmask.py, rewritten literally (global torch RNG, non-stable argsort)."""

    def attention_masking(attention, masking_mode, masking_ratio):
        count = int(attention.shape[1] * masking_ratio)
        out = torch.zeros(attention.shape, dtype=torch.bool, device=attention.device)
        if masking_mode in ["attmask_high", "attmask_hint"]:
            idx = torch.argsort(attention, descending=True)[:, :count]
        elif masking_mode == "attmask_low":
            idx = torch.argsort(attention, descending=False)[:, :count]
        else:
            raise ValueError(masking_mode)
        out.scatter_(1, idx, True)
        return out

    def get_mask(attention, masking_prob, masking_mode, masking_ratio):
        token_mask = attention_masking(attention, masking_mode, masking_ratio)
        u = torch.rand(attention.shape[0], device=attention.device)
        token_mask[u > masking_prob] = False
        return token_mask

    def show_hints(top_masks, masks, show_ratio):
        _, n_tokens = masks.shape
        reveal_tokens = int(show_ratio * n_tokens)
        selected_high = torch.multinomial(top_masks.float(), reveal_tokens)
        masks.scatter_(1, selected_high, False)
        return masks

    masks = get_mask(attention, masking_prob, masking_mode, masking_ratio)
    if masking_mode == "attmask_hint":
        top_masks = get_mask(attention, 1, masking_mode, show_max)
        masks = show_hints(top_masks, masks, show_ratio)
    return masks


def official_get_pred_ratio(pred_ratio, pred_ratio_var, rng: random.Random) -> float:
    """iBOT / AttMask ``ImageFolderMask.get_pred_ratio`` (after its list handling), on ``rng``."""
    if isinstance(pred_ratio, list) and len(pred_ratio) == 1:
        pred_ratio = pred_ratio[0]
    if isinstance(pred_ratio_var, list) and len(pred_ratio_var) == 1:
        pred_ratio_var = pred_ratio_var[0]
    if isinstance(pred_ratio, list) and not isinstance(pred_ratio_var, list):
        pred_ratio_var = [pred_ratio_var] * len(pred_ratio)
    if isinstance(pred_ratio, list):
        values = []
        for prm, prv in zip(pred_ratio, pred_ratio_var):
            assert prm >= prv
            values.append(rng.uniform(prm - prv, prm + prv) if prv > 0 else prm)
        return rng.choice(values)
    assert pred_ratio >= pred_ratio_var
    return rng.uniform(pred_ratio - pred_ratio_var, pred_ratio + pred_ratio_var) if pred_ratio_var > 0 else pred_ratio


# ---------------------------------------------------------------- exact sets
@pytest.mark.parametrize("strategy, largest", [("high", True), ("low", False)])
def test_high_low_mask_exactly_the_ranked_patches(strategy, largest):
    attn = distinct_attention(6, 50)
    r = 0.3  # int(50 * 0.3) = 15
    mask = attmask(attn, r, strategy, masking_prob=1.0, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (6, 50)
    expected = torch.zeros_like(mask).scatter_(1, attn.topk(15, dim=1, largest=largest).indices, True)
    assert torch.equal(mask, expected)
    assert mask.sum(1).tolist() == [15] * 6


def test_hand_example_high_and_low():
    attn = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15], [0.30, 0.01, 0.29, 0.20, 0.20]])
    g = torch.Generator().manual_seed(0)
    # N = 5, r = 0.4 -> int(2.0) = 2 patches per row
    high = attmask(attn, 0.4, "high", masking_prob=1.0, generator=g)
    low = attmask(attn, 0.4, "low", masking_prob=1.0, generator=g)
    assert high.tolist() == [[False, True, False, True, False], [True, False, True, False, False]]
    # row 1: 0.20 ties at patches 3 and 4; the lower index wins
    assert low.tolist() == [[True, False, True, False, False], [False, True, False, True, False]]


def test_count_truncates_the_float_product_like_the_official_int():
    attn = distinct_attention(2, 100)
    mask = attmask(attn, 0.29, "high", masking_prob=1.0)  # 100 * 0.29 = 28.999999999999996
    assert mask.sum(1).tolist() == [28, 28]
    assert attmask(attn, 0.0, "high", masking_prob=1.0).sum() == 0
    assert attmask(attn, 1.0, "low", masking_prob=1.0).all()


def test_ties_go_to_the_lower_index():
    attn = torch.full((3, 10), 0.1)
    for strategy in ("high", "low"):
        mask = attmask(attn, 0.3, strategy, masking_prob=1.0)
        assert torch.equal(mask, torch.tensor([[True] * 3 + [False] * 7] * 3))
    assert torch.equal(rank_mask(attn, 4), torch.tensor([[True] * 4 + [False] * 6] * 3))


# ---------------------------------------------------------------- hints
def test_hint_reveals_the_stated_count_from_the_top_tenth_only():
    b, n = 32, 196
    attn = distinct_attention(b, n, seed=1)
    top = rank_mask(attn, int(n * 0.1))  # 19 most attended
    for r, r_hint in ((0.5, None), (0.3, 0.5), (0.1, 0.1)):
        g = torch.Generator().manual_seed(3)
        mask = attmask(attn, r, "hint", masking_prob=1.0, generator=g, hint_ratio=r_hint)
        high = rank_mask(attn, int(n * r))
        revealed = high & ~mask
        n_reveal = int(0.1 * (r if r_hint is None else r_hint) * n)  # 9, 9, 1
        assert not (mask & ~high).any()  # nothing outside the High mask is masked
        assert (revealed & ~top).sum() == 0  # revealed patches come from the top 10%
        assert revealed.sum(1).tolist() == [n_reveal] * b
        assert mask.sum(1).tolist() == [int(n * r) - n_reveal] * b
    # the reveal is random: different rows / seeds reveal different subsets of the top 10%
    a = attmask(attn, 0.5, "hint", masking_prob=1.0, generator=torch.Generator().manual_seed(1))
    c = attmask(attn, 0.5, "hint", masking_prob=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, c)


def test_hint_with_a_ratio_below_show_max_can_draw_unmasked_patches():
    b, n = 64, 400
    attn = distinct_attention(b, n, seed=2)
    r = 0.05  # 20 masked, hints drawn among the top 40, int(0.1 * 0.05 * 400) = 2 draws
    mask = attmask(attn, r, "hint", masking_prob=1.0, generator=torch.Generator().manual_seed(0))
    high = rank_mask(attn, 20)
    revealed = (high & ~mask).sum(1)
    assert not (mask & ~high).any()
    assert revealed.max() <= 2 and revealed.min() < 2  # some draws hit top-40 patches left unmasked


def test_hint_with_zero_reveals_is_high():
    attn = distinct_attention(4, 20)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    # int(0.1 * 0.3 * 20) = int(0.6) = 0 hints: the official torch.multinomial(.., 0) would raise
    hint = attmask(attn, 0.3, "hint", masking_prob=0.5, generator=g1)
    high = attmask(attn, 0.3, "high", masking_prob=0.5, generator=g2)
    assert torch.equal(hint, high)


# ---------------------------------------------------------------- masking probability
@pytest.mark.parametrize("p", [0.5, 0.2])
def test_each_row_is_masked_with_probability_masking_prob(p):
    b, n = 4000, 16
    attn = distinct_attention(1, n).expand(b, n)
    for strategy in ("high", "low", "hint"):
        mask = attmask(attn, 0.5, strategy, masking_prob=p, generator=torch.Generator().manual_seed(7))
        rows_masked = mask.any(1)
        expected_count = 8 - (int(0.1 * 0.5 * 16) if strategy == "hint" else 0)  # hint: 0 reveals at N=16
        assert set(mask.sum(1).tolist()) == {0, expected_count}  # all-or-nothing per row
        sigma = (p * (1 - p) / b) ** 0.5
        assert abs(rows_masked.float().mean().item() - p) < 4 * sigma


def test_masking_prob_extremes():
    attn = distinct_attention(100, 16)
    assert attmask(attn, 0.5, "high", masking_prob=1.0).sum(1).eq(8).all()
    assert not attmask(attn, 0.5, "high", masking_prob=0.0).any()


# ---------------------------------------------------------------- determinism
def test_same_generator_state_same_masks():
    attn = distinct_attention(16, 49)
    for strategy in ("high", "low", "hint"):
        a = attmask(attn, 0.4, strategy, generator=torch.Generator().manual_seed(11))
        b = attmask(attn, 0.4, strategy, generator=torch.Generator().manual_seed(11))
        c = attmask(attn, 0.4, strategy, generator=torch.Generator().manual_seed(12))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


# ---------------------------------------------------------------- official equality
@pytest.mark.parametrize("strategy", ["high", "low", "hint"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_the_official_code_on_identical_tensors_and_streams(strategy, seed):
    b, n = 24, 196  # 2 global crops x 12 images, 14 x 14 patches
    attn = distinct_attention(b, n, seed=seed)
    for r, r_hint in ((0.3, 0.3), (0.47, 0.12), (0.1, 0.5)):
        torch.manual_seed(seed)
        expected = official_attmask(attn, 0.5, f"attmask_{strategy}", r, 0.1 * r_hint, 0.1)
        after_official = torch.rand(4)
        g = torch.Generator().manual_seed(seed)
        got = attmask(attn, r, strategy, masking_prob=0.5, generator=g, show_max=0.1, hint_ratio=r_hint)
        assert torch.equal(got, expected), (strategy, seed, r)
        assert torch.equal(torch.rand(4, generator=g), after_official)  # same draws consumed


# ---------------------------------------------------------------- batch ratio
def test_draw_batch_ratio_fixed_and_uniform():
    g = torch.Generator().manual_seed(0)
    assert draw_batch_ratio([0.3], [0.0], g) == 0.3
    assert draw_batch_ratio(0.3, 0, g) == 0.3
    ours = torch.tensor([draw_batch_ratio([0.3], [0.2], g) for _ in range(4000)])
    rng = random.Random(0)
    theirs = torch.tensor([official_get_pred_ratio([0.3], [0.2], rng) for _ in range(4000)])
    for sample in (ours, theirs):
        assert sample.min() >= 0.1 and sample.max() <= 0.5
        assert abs(sample.mean().item() - 0.3) < 0.01
        # U(0.1, 0.5): quartiles at 0.2, 0.3, 0.4
        q = torch.quantile(sample.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        assert torch.allclose(q, torch.tensor([0.2, 0.3, 0.4], dtype=torch.float64), atol=0.015)


def test_draw_batch_ratio_list_picks_one_entry_uniformly():
    g = torch.Generator().manual_seed(1)
    draws = [draw_batch_ratio([0.1, 0.5], [0.0], g) for _ in range(2000)]
    assert set(draws) == {0.1, 0.5}
    assert abs(draws.count(0.1) / 2000 - 0.5) < 0.05
    mixed = torch.tensor([draw_batch_ratio([0.0, 0.3], [0.0, 0.2], g) for _ in range(4000)])
    zero = mixed == 0.0
    assert abs(zero.float().mean().item() - 0.5) < 0.04
    assert mixed[~zero].min() >= 0.1 and mixed[~zero].max() <= 0.5
    a = [draw_batch_ratio([0.3, 0.6], [0.2], torch.Generator().manual_seed(9)) for _ in range(3)]
    b = [draw_batch_ratio([0.3, 0.6], [0.2], torch.Generator().manual_seed(9)) for _ in range(3)]
    assert a == b


def test_bad_arguments():
    attn = distinct_attention(2, 10)
    with pytest.raises(ValueError, match="strategy"):
        attmask(attn, 0.3, "random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        attmask(attn[None], 0.3)
    with pytest.raises(ValueError, match="ratio"):
        attmask(attn, 1.5)
    with pytest.raises(ValueError, match="pred_ratio_var"):
        draw_batch_ratio([0.1], [0.2])
    with pytest.raises(ValueError, match="1 or as many"):
        draw_batch_ratio([0.1, 0.2, 0.3], [0.0, 0.0])
