import os

import pytest
import torch
from torch import nn

from ssl_distill.checkpoints import CheckpointError, atomic_save, load_file, load_state_strict, rng_state, set_rng_state
from ssl_distill.engine.ema import ema_update
from ssl_distill.engine.train import clip_gradients_per_param, param_groups


def test_per_parameter_clipping_like_dino():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> scaled to norm 3
    b.grad = torch.tensor([0.3, 0.4])  # norm 0.5 -> untouched
    norms = clip_gradients_per_param([a, b], 3.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) * 3.0 / (5.0 + 1e-6))
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))


def test_ema_update_formula():
    t, s = nn.Linear(2, 2), nn.Linear(2, 2)
    t0 = [p.clone() for p in t.parameters()]
    ema_update(t, s, 0.9)
    for p_t, p0, p_s in zip(t.parameters(), t0, s.parameters()):
        torch.testing.assert_close(p_t, 0.9 * p0 + 0.1 * p_s)


def test_weight_decay_only_on_weights():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = param_groups(m)
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([4, 4])]
    assert len(groups[1]["params"]) == 3 and groups[1]["weight_decay"] == 0.0


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    atomic_save({"x": torch.ones(2)}, path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        atomic_save({"x": torch.zeros(2)}, path)
    assert torch.equal(load_file(path)["x"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temporary left behind


def test_strict_loading_names_the_keys():
    m = nn.Linear(3, 2)
    sd = {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        load_state_strict(m, sd, "ckpt")
    msg = str(e.value)
    assert "missing keys ['bias']" in msg and "unexpected keys ['extra']" in msg and "weight: checkpoint (2, 4)" in msg


def test_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, p, _use_new_zipfile_serialization=True)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_file(p)


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_roundtrip(state))
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def load_roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
