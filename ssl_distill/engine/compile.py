"""``run.compile``: torch.compile of the transformer blocks (issue 28), ``off`` | ``on`` | ``auto``.

What is compiled: every block of a backbone's ``vit.blocks``, the part every
:class:`~ssl_distill.models.backbone.TokenBackbone` shares (timm's ``Block`` in
:class:`~ssl_distill.models.backbone.ViTBackbone`, timm's Eva block with its RoPE argument in
:class:`~ssl_distill.models.rope_backbone.RopeViTBackbone`). The blocks hold nearly all of a step's FLOPs
and most of its small ops (casts, GELU, residual adds, LayerNorms: benchmarks/bench_step_profile.py), which is
what inductor fuses; the heads, losses, masks and crop grouping stay eager. Each block is compiled in place
(``nn.Module.compile``): parameter names and ``state_dict`` keys stay those of the eager model (no
``_orig_mod.`` prefix), so a checkpoint written in one mode resumes in the other. Shapes are static: one
graph per crop resolution (and per batch size and gradient mode, e.g. student and teacher), compiled at its
first call; the blocks of one backbone share their graphs (their parameters are the graph's inputs). Random
ops inside a block (drop-path) draw from torch's generator as eager ones do (inductor's ``fallback_random``),
so a compiled run draws the same drop-path masks as an eager one and stays deterministic.

``auto`` times one block's forward and backward at the global crops' size, eager against compiled, once at the
run's start (rank 0 measures, every rank takes its choice; the checkpoint keeps it like ``run.precision``,
so a resumed run does not switch on a timing taken on a busy machine) and compiles where that is at least
5% faster.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..models.backbone import TokenBackbone
from ..runtime import autocast_context

# graphs per block code: (resolution x batch size x gradient mode) of the step, the online k-NN's extraction
# batches (a last smaller one), the Gram teacher's crops; torch's default 8 would send the rest back to eager
RECOMPILE_LIMIT = 64
WIN = 0.95  # auto compiles where a block's compiled step takes at most this fraction of the eager one


def compile_blocks(backbones: Iterable[TokenBackbone]) -> int:
    """Compile every block of ``backbones`` in place (static shapes); returns how many."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._inductor.config.fallback_random = True
    n = 0
    for backbone in backbones:
        for block in backbone.vit.blocks:
            block.compile(dynamic=False)
            n += 1
    return n


def _block_step_seconds(block: nn.Module, x: torch.Tensor, kwargs: dict, precision: str, sync: Callable[[], None],
                        reps: int) -> float:
    """The fastest of ``reps`` forward + backward passes of ``block`` on ``x`` (B, T, D)."""
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        with autocast_context(x.device, precision):
            out = block(x, **kwargs)
        out.float().square().mean().backward()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def time_block(backbone: TokenBackbone, batch_size: int, image_size: int, precision: str,
               reps: int = 3) -> tuple[float, float, float]:
    """(eager seconds, compiled seconds, compile seconds) of one forward + backward of a copy of ``backbone``'s
    first block on ``batch_size`` random token sequences of an ``image_size`` crop, in ``precision``."""
    device = next(backbone.parameters()).device
    grid = (image_size // backbone.patch_size,) * 2
    tokens = backbone.num_prefix_tokens + grid[0] * grid[1]
    dtype = torch.float32 if precision == "fp32" else torch.float16 if precision == "fp16" else torch.bfloat16
    kwargs = backbone._block_kwargs(grid, 1, dtype)[0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)  # the run's random streams are not touched
    x = torch.randn(batch_size, tokens, backbone.embed_dim, generator=gen).to(device).requires_grad_()
    eager = copy.deepcopy(backbone.vit.blocks[0])
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=False)
    t0 = time.perf_counter()
    _block_step_seconds(compiled, x, kwargs, precision, sync, 1)  # the graph is built here
    warmup = time.perf_counter() - t0
    seconds_eager = _block_step_seconds(eager, x, kwargs, precision, sync, reps)
    seconds_compiled = _block_step_seconds(compiled, x, kwargs, precision, sync, reps)
    return seconds_eager, seconds_compiled, warmup


def compile_wins(backbone: TokenBackbone, batch_size: int, image_size: int, precision: str) -> tuple[bool, str]:
    """``auto``'s measurement: whether the compiled block is faster here, and a line saying by how much. The
    timed copies' drop path and RoPE coordinate draws come from a forked generator: the run's streams stay
    as an ``on`` / ``off`` run's."""
    device = next(backbone.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        eager, compiled, warmup = time_block(backbone, batch_size, image_size, precision)
    wins = compiled <= WIN * eager
    return wins, (f"a block's step takes {compiled * 1e3:.1f} ms compiled, {eager * 1e3:.1f} ms eager "
                  f"(compiled in {warmup:.0f} s)")
