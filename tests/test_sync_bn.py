"""BatchNorm heads over several CPU processes: SyncBatchNorm1d against nn.BatchNorm1d on the full
batch, 1 process x batch 2B against 2 gloo processes x batch B, and the teachers-agree check on
buffers. The multi-process tests spawn 2 gloo processes (torch.multiprocessing)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ssl_distill.checkpoints import load_file
from ssl_distill.config import load_config
from ssl_distill.engine.train import Trainer
from ssl_distill.models import DINOHead, SyncBatchNorm1d

from gloo import spawn_gloo
from test_end_to_end import CONFIG, make_folder, tiny_overrides


# ---------------------------------------------------------------------- the layer
def test_one_process_is_plain_batchnorm1d():
    torch.manual_seed(0)
    head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4, use_bn=True)
    synced = SyncBatchNorm1d.convert(copy.deepcopy(head))
    assert sum(isinstance(m, SyncBatchNorm1d) for m in synced.modules()) == 2
    assert list(synced.state_dict()) == list(head.state_dict())
    x = torch.randn(10, 8)
    for train in (True, False):
        head.train(train)
        synced.train(train)
        assert torch.equal(head(x), synced(x))
    for (k, a), b in zip(head.state_dict().items(), synced.state_dict().values()):
        assert torch.equal(a, b), k


def _bn_matches_full_batch(rank: int, world: int) -> None:
    """Each rank holds an uneven share of a batch; outputs, input gradients, summed weight / bias
    gradients and running statistics equal nn.BatchNorm1d on the whole batch, in (N, C) and (N, C, L)."""
    sizes = [5, 7]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for shape in ((12, 6), (12, 6, 3)):
        torch.manual_seed(0)
        ref = nn.BatchNorm1d(6, momentum=0.3)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1.0, 1.0)
        bn = SyncBatchNorm1d.convert(copy.deepcopy(ref))
        x = torch.randn(shape) * 3 + 5  # a mean well away from 0
        g = torch.randn(shape)
        for it in range(3):  # running statistics accumulate over calls
            xf = (x * (1 + it)).requires_grad_()
            yf = ref(xf)
            (yf * g).sum().backward()
            xl = (x * (1 + it))[lo:hi].clone().requires_grad_()
            yl = bn(xl)
            (yl * g[lo:hi]).sum().backward()
            torch.testing.assert_close(yl, yf[lo:hi], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(xl.grad, xf.grad[lo:hi], rtol=1e-5, atol=1e-6)
        grads = torch.cat([bn.weight.grad, bn.bias.grad])
        dist.all_reduce(grads)  # what DDP does (up to its 1 / world)
        torch.testing.assert_close(grads, torch.cat([ref.weight.grad, ref.bias.grad]), rtol=1e-5, atol=1e-5)
        for (k, a), b in zip(bn.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
        bn.eval()
        ref.eval()
        torch.testing.assert_close(bn(x[lo:hi]), ref(x)[lo:hi])


def test_two_processes_equal_batchnorm_on_the_full_batch():
    spawn_gloo(_bn_matches_full_batch)


# ---------------------------------------------------------------------- the training loop
@pytest.fixture(scope="module")
def train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("syncbn") / "train", 16, 0)  # 32 images


def _bn_overrides(train_dir: Path, out: Path, batch_size: int) -> list[str]:
    """The tiny BN-head run (the demo recipe has use_bn_in_head) in fp32 without drop-path: with
    augmentations a function of (seed, epoch, index), nothing random depends on the process count."""
    return tiny_overrides(train_dir, out) + [
        "model.use_bn_in_head=true", "run.precision=fp32", "model.drop_path_rate=0.0",
        f"data.batch_size={batch_size}", "run.log_every=1", "run.checkpoint_every=100",
    ]


def _train_recording_losses(trainer: Trainer) -> list[float]:
    """fit(), returning this rank's loss at every step."""
    losses: list[float] = []
    real_step = trainer.train_step

    def step(*args: Any, **kwargs: Any) -> dict[str, float]:
        out = real_step(*args, **kwargs)
        losses.append(out["loss"])
        return out

    trainer.train_step = step  # type: ignore[method-assign]
    trainer.fit()
    return losses


def _train_two_processes(rank: int, world: int, train_dir: Path, out: Path) -> None:
    trainer = Trainer(load_config(CONFIG, _bn_overrides(train_dir, out, 4)), device=torch.device("cpu"))
    assert sum(isinstance(m, SyncBatchNorm1d) for m in trainer.teacher.modules()) == 2
    losses = _train_recording_losses(trainer)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, losses)
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(per_rank))


@pytest.mark.slow
def test_one_process_batch_2b_equals_two_processes_batch_b(train_dir, tmp_path):
    """Step k of 1 process x batch 8 sees the union of the two ranks' batches of 4 (rank r takes
    positions r, r + 2, ... of the epoch's permutation), so with global BatchNorm statistics the
    losses (mean over the two ranks) and the final teacher, BN buffers and center agree."""
    one = Trainer(load_config(CONFIG, _bn_overrides(train_dir, tmp_path / "one", 8)))
    losses_one = _train_recording_losses(one)
    spawn_gloo(_train_two_processes, train_dir, tmp_path / "two")
    r0, r1 = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert len(losses_one) == len(r0) == len(r1) == 8  # 32 images / 8 per step x 2 epochs
    torch.testing.assert_close(torch.tensor([(a + b) / 2 for a, b in zip(r0, r1)], dtype=torch.float64),
                               torch.tensor(losses_one, dtype=torch.float64), rtol=1e-5, atol=0)
    a, b = load_file(tmp_path / "one" / "checkpoint.pth"), load_file(tmp_path / "two" / "checkpoint.pth")
    assert a["step"] == b["step"] == 8 and (a["world_size"], b["world_size"]) == (1, 2)
    assert list(a["teacher"]) == list(b["teacher"])  # checkpoints keep nn.BatchNorm1d's keys
    assert any(k.endswith("running_var") for k in a["teacher"])
    # atol: parameters whose gradient is zero in exact arithmetic (biases feeding a BatchNorm or the
    # final LayerNorm, attention key biases) get Adam-normalized rounding noise as updates, which
    # differs with the summation order; they, and the running means they shift, move by ~5e-6 here
    for key in a["teacher"]:
        torch.testing.assert_close(b["teacher"][key], a["teacher"][key], rtol=1e-5, atol=2e-5, msg=key)
    torch.testing.assert_close(b["loss"]["center"], a["loss"]["center"], rtol=1e-5, atol=1e-6)


def _buffer_differs_on_rank_1(rank: int, world: int, train_dir: Path, out: Path) -> None:
    trainer = Trainer(load_config(CONFIG, _bn_overrides(train_dir, out, 4)), device=torch.device("cpu"))
    trainer.save_checkpoint()  # identical teachers: fine
    if rank == 1:
        bn = next(m for m in trainer.teacher.modules() if isinstance(m, nn.BatchNorm1d))
        bn.running_var[0] += 1e-3  # parameters and center stay identical
    with pytest.raises(RuntimeError, match="teacher buffers differ across ranks at step 0"):
        trainer.save_checkpoint()


def test_teachers_agree_check_covers_buffers(train_dir, tmp_path):
    spawn_gloo(_buffer_differs_on_rank_1, train_dir, tmp_path)
