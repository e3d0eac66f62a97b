"""Training-step throughput of the engine, per objective (DINO, iBOT, AttMask) on this CPU.

ViT-S/16, 2 x 224 + 10 x 96 crops, batch 8, bf16 autocast, plain attention on CPU. ``--objectives``
times the same step with DINO's recipe (out_dim 65536), with iBOT's patch term added on that same head
(block masks, pred_ratio [0, 0.3] +- [0, 0.2]) and with AttMask-High instead of block masks, then the
iBOT ViT-S/16 recipe itself (out_dim 8192), then ODIS (iBOT's terms + the [OBJ] term, object-aware crops
from a boxes file of the photos), all five built first and then timed round-robin on their own batches
(a machine whose speed drifts slows each alike, so the ratios are fair); targets: iBOT <= 1.3x DINO,
AttMask <= 1.05x iBOT, ODIS <= 1.1x iBOT.
``--dinov3`` times DINOv3's objectives (DINO + iBOT on separate heads, Sinkhorn-Knopp, KoLeo; no Gram term)
on DINOv3's ViT-S/16 (RoPE, 4 registers, LayerScale, the student's RoPE coordinate rescaling) against the
same step on the learned-position ViT-S/16 (target: <= 1.05x), and on that ViT with 4 registers and
LayerScale (the part of the difference that is not RoPE), interleaved.
``--scenes`` times ODIS's step against iBOT's on one batch of 4-item black canvases (the recipe
configs/odis_tiny_scenes4.yaml, its tiny ViT; iBOT: the same recipe on plain crops with the [CLS] term instead
of [OBJ]), interleaved, beside the machine's GEMM peaks; target: ODIS <= 1.1x iBOT.
``--held`` times the DINOv3 continue recipe's step (configs/dinov3_vits16_continue.yaml: RoPE ViT-S/16 started
from a file, frozen Gram teacher from that file) while optim.freeze_backbone_steps holds the backbone still (its
first 500 steps: no graph through the backbone, no backward there) against the same step with the backbone
trained, interleaved; the file is a fresh scratch-recipe run's checkpoint (random weights: the cost is the same).
Beside the DINO figure, the same step in fp32 with the fused attention kernel (the precision the official
DINO runs in on a CPU: its autocast is CUDA's fp16), the model GFLOP/s achieved (FLOPs counted by torch's
FlopCounterMode for one full step) and the machine's measured fp32 / bf16 GEMM peaks. With ``--dino-repo`` (a
checkout of facebookresearch/dino) the official DINO modules' own step (``bench_gpu_step.official_dino``: its
ViT-S/16, head, loss, clipping, AdamW and EMA on random crops of the same shapes) runs interleaved with ours, in
fp32 as ``main_dino.py`` runs on a CPU and in bf16 autocast as ours (issue 28's target: ours >= 2.2x the
former).
On a GPU (``--device cuda``) the same steps run with CUDA's fused attention, timed to the GPU's end
(synchronised), beside the GPU's measured bf16 / fp32 GEMM TFLOP/s; ``--batch-size 64`` is DINO's per-GPU
batch (1024 over 16 GPUs).
Usage: python benchmarks/bench_train_step.py [--steps N] [--skip-fp32] [--objectives] [--dinov3]
           [--scenes] [--held] [--dino-repo DIR] [--device cuda] [--batch-size B]
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ssl_distill.hardware import cuda_line, device_sync, gemm_gflops, hardware_line, peak_rss_mib  # noqa: E402

from ssl_distill.config import load_config  # noqa: E402
from ssl_distill.engine.train import Trainer  # noqa: E402


def count_cpu_fused_attention() -> None:
    """torch's FlopCounterMode has formulas for the CUDA fused-attention kernels, none for the CPU's: give the CPU
    kernel (forward and backward) the same count, so a step or forward with fused attention on the CPU (the frozen
    Gram teacher's, the official modules') is not undercounted by its attention products."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

    ops = torch.ops.aten
    if ops._scaled_dot_product_flash_attention_for_cpu in flop_registry:
        return

    @register_flop_formula(ops._scaled_dot_product_flash_attention_for_cpu)
    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(ops._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


count_cpu_fused_attention()

ROOT = Path(__file__).resolve().parents[1]


def photo_folder(dst: Path) -> Path:
    """A folder of the real photos scikit-image ships (no download)."""
    import shutil

    import skimage

    src = Path(skimage.__file__).parent / "data"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "hubble_deep_field.jpg", "ihc.png", "retina.jpg"):
        shutil.copy(src / name, dst / name)
    return dst


IBOT = ["ibot.weight=1", "masking.shape=block", "masking.pred_ratio=[0,0.3]", "masking.pred_ratio_var=[0,0.2]"]
ATTMASK = ["ibot.weight=1", "masking.attmask=high", "masking.pred_ratio=0.3", "masking.pred_ratio_var=0.2"]
ODIS = [*IBOT, "odis.weight=1", "dino.weight=0"]  # ODIS's default: the [OBJ] and patch terms, no [CLS] term
DINOV3_TERMS = [*IBOT, "ibot.shared_head=false", "dino.centering=sinkhorn_knopp", "ibot.centering=sinkhorn_knopp",
                "dino.koleo_weight=0.1"]  # DINOv3's objectives without Gram anchoring
REG_LS = ["model.reg_tokens=4", "model.layer_scale=1e-5"]
ROPE = ["model.pos_embed=rope", *REG_LS]  # DINOv3's ViT-S/16 (rope_rescale_coords: 2, its default)


def batch_folder(dst: Path, batch_size: int) -> Path:
    """:func:`photo_folder` with the photos copied under other names until it holds ``batch_size`` images."""
    data = photo_folder(dst)
    photos = sorted(data.iterdir())
    for k in range(1, -(-batch_size // len(photos))):
        for f in photos:
            (data / f"{f.stem}_{k}{f.suffix}").write_bytes(f.read_bytes())
    return data


def photo_boxes(folder: Path) -> Path:
    """A COCO boxes file for the photo folder: per photo two boxes (the central half and a corner
    quarter), so object-aware crops have a target and a distractor."""
    import json

    from PIL import Image

    images, annotations = [], []
    for i, path in enumerate(sorted(folder.iterdir())):
        if path.suffix not in (".png", ".jpg"):
            continue
        w, h = Image.open(path).size
        images.append({"id": i, "file_name": path.name, "width": w, "height": h})
        for box in ([w / 4, h / 4, w / 2, h / 2], [0, 0, w / 4, h / 4]):
            annotations.append({"id": len(annotations), "image_id": i, "bbox": box})
    out = folder.parent / "photo_boxes.json"
    out.write_text(json.dumps({"images": images, "annotations": annotations}))
    return out


@dataclass
class Step:
    """One trainer with one real multi-crop batch: ``run(i)`` is training step ``i`` on that batch."""

    trainer: Trainer
    args: tuple
    batch_size: int
    gflop: float

    def run(self, i: int) -> float:
        sync = device_sync(self.trainer.device)
        sync()
        t0 = time.perf_counter()
        self.trainer.train_step(self.args[0], i, *self.args[1:])
        sync()
        return time.perf_counter() - t0


def prepare(cfg_overrides: list[str], data_dir: Path, out_dir: Path,
            recipe: str = "dino_vit_small16.yaml") -> Step:
    """A trainer on one real batch, warmed up (kernel selection, allocator), its FLOPs per step counted."""
    cfg = load_config(ROOT / "configs" / recipe, [
        f"data.train_dir={data_dir}", f"run.output_dir={out_dir}", "data.num_workers=0", "run.progress=false",
        *cfg_overrides,
    ])
    trainer = Trainer(cfg, fresh=True)
    trainer.sampler.set_epoch(0)
    step = Step(trainer, trainer.step_inputs(next(iter(trainer.loader))), cfg.data.batch_size, 0.0)
    step.run(0)
    with FlopCounterMode(display=False) as counter:
        step.run(1)
    step.gflop = counter.get_total_flops() / 1e9
    return step


def images_per_s(steps: list[Step], reps: int) -> list[float]:
    """Images/s of each step (its fastest of ``reps``), timed round-robin so that a drift of the
    machine's speed (other load, clocks) falls on every step alike: ratios between them are fair."""
    best = [float("inf")] * len(steps)
    for r in range(reps):
        for j, st in enumerate(steps):
            best[j] = min(best[j], st.run(2 + r))
    return [st.batch_size / b for st, b in zip(steps, best)]


def measure(cfg_overrides: list[str], data_dir: Path, out_dir: Path, steps: int,
            recipe: str = "dino_vit_small16.yaml") -> tuple[float, float]:
    """Returns (images/s, GFLOP per step) of Trainer.train_step on one real multi-crop batch."""
    st = prepare(cfg_overrides, data_dir, out_dir, recipe)
    return images_per_s([st], steps)[0], st.gflop


def scene_steps(tmp: Path, run: list[str], reps: int) -> None:
    """``--scenes``: ODIS's and iBOT's steps on the same 4-item black canvases, interleaved (module docstring)."""
    from ssl_distill.data.scenes import SceneSettings, build_scene_benchmark

    scenes = tmp / "scenes4"
    settings = SceneSettings(size=56, min_objects=4, max_objects=4, min_scale=0.35, max_scale=0.5, max_overlap=0.1,
                             tint=False, background="black")
    build_scene_benchmark(scenes, None, n_train=max(64, int(run[0].partition("=")[2])), n_test=0, settings=settings)
    train, boxes = scenes / "train", f"data.boxes={scenes / 'train' / 'boxes.json'}"
    run = [*run, "optim.epochs=100"]  # one batch of scenes per epoch: a schedule long enough for every step
    plain = ["data.boxes=null", "data.crops.object_aware_local=false", "odis.weight=0", "dino.weight=1",
             "monitor.knn_layout=cls"]
    steps = {"iBOT": prepare([*run, boxes, *plain], train, tmp / "s_ibot", recipe="odis_tiny_scenes4.yaml"),
             "ODIS": prepare([*run, boxes], train, tmp / "s_odis", recipe="odis_tiny_scenes4.yaml")}
    speed = dict(zip(steps, images_per_s(list(steps.values()), reps)))
    bf16_peak, fp32_peak = gemm_gflops(torch.bfloat16), gemm_gflops(torch.float32)
    for name, st in steps.items():
        print(f"{name} on 4-item scenes (odis_tiny_scenes4.yaml, batch {st.batch_size}): {speed[name]:.1f} images/s "
              f"({st.gflop:.2f} GFLOP/step, {st.gflop * speed[name] / st.batch_size:.0f} GFLOP/s achieved)")
    print(f"ODIS step {speed['iBOT'] / speed['ODIS']:.3f}x iBOT's (interleaved, fastest of {reps} each; target "
          f"<= 1.1x); GEMM peaks bf16 {bf16_peak:.0f}, fp32 {fp32_peak:.0f} GFLOP/s")


def held_steps(tmp: Path, run: list[str], reps: int) -> None:
    """``--held``: the continue recipe's step with the backbone held still against it trained (module docstring)."""
    data = batch_folder(tmp / "photos", int(run[0].partition("=")[2]))
    scratch = prepare([*run, "optim.epochs=200000"], data, tmp / "scratch", "dinov3_vits16_scratch.yaml")
    scratch.trainer.save_checkpoint()  # the file to continue from (and the Gram teacher's)
    start = [*run, f"model.init_from={tmp / 'scratch' / 'checkpoint.pth'}", "optim.epochs=1000"]
    del scratch
    steps = {"held": prepare(start, data, tmp / "held", "dinov3_vits16_continue.yaml"),
             "trained": prepare([*start, "optim.freeze_backbone_steps=0"], data, tmp / "trained",
                                "dinov3_vits16_continue.yaml")}
    speed = dict(zip(steps, images_per_s(list(steps.values()), reps)))
    bf16_peak = gemm_gflops(torch.bfloat16)
    for name, what in (("held", "backbone held still (optim.freeze_backbone_steps, its first 500 steps)"),
                       ("trained", "backbone trained (the steps after)")):
        st = steps[name]
        print(f"continue recipe, {what}: {st.batch_size / speed[name]:.2f} s/step ({st.gflop:.0f} GFLOP/step, "
              f"{st.gflop * speed[name] / st.batch_size:.0f} GFLOP/s achieved)")
    print(f"held step {speed['held'] / speed['trained']:.2f}x faster (interleaved, fastest of {reps} each); "
          f"bf16 GEMM peak {bf16_peak:.0f} GFLOP/s")


def official_rows(dino_step: Step, repo: Path, batch: int, reps: int) -> None:
    """``--dino-repo``: the official DINO modules' step in fp32 and in bf16 beside ours, interleaved (docstring)."""
    from bench_gpu_step import Row, Sizes, fastest, official_dino

    sizes = Sizes(batch, 224, 96, 10, 65536)  # dino_vit_small16.yaml's crops and head
    device = torch.device("cpu")
    counter = itertools.count(2)  # our step's index: 0 and 1 were the warm-up
    rows = [Row("ours", lambda: dino_step.run(next(counter))), official_dino(repo, sizes, device, bf16=False).count(),
            official_dino(repo, sizes, device).count()]
    best = dict(zip(("ours", "fp32", "bf16"), fastest(rows, reps, device)))
    print(f"official DINO modules (interleaved, fastest of {reps}): fp32, as main_dino.py runs on a CPU, "
          f"{best['fp32']:.2f} s/step; bf16 autocast {best['bf16']:.2f} s/step; ours {best['ours']:.2f} s/step = "
          f"{best['fp32'] / best['ours']:.2f}x the fp32 one (target >= 2.2x), {best['bf16'] / best['ours']:.2f}x "
          f"the bf16 one")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-fp32", action="store_true")
    ap.add_argument("--objectives", action="store_true",
                    help="also time iBOT, AttMask and ODIS on the same step, interleaved with DINO's")
    ap.add_argument("--dinov3", action="store_true",
                    help="time DINOv3's objectives on the RoPE ViT-S/16 against the learned-position one")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--scenes", action="store_true",
                    help="only ODIS against iBOT on 4-item black canvases (the tiny scene recipe), interleaved")
    ap.add_argument("--dino-repo", type=Path, help="a checkout of facebookresearch/dino: its modules' step beside ours")
    ap.add_argument("--held", action="store_true",
                    help="only the DINOv3 continue recipe's step with its backbone held still against trained")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    if args.held or args.scenes:  # a mode timed alone
        timed, min_reps = (held_steps, 4) if args.held else (scene_steps, 8)
        with tempfile.TemporaryDirectory() as tmp:
            print(cuda_line() if gpu else hardware_line())
            timed(Path(tmp), [f"data.batch_size={args.batch_size}", f"run.device={args.device}",
                              "run.precision=bf16"], max(args.steps, min_reps))
        return
    run = [f"data.batch_size={args.batch_size}", f"run.device={args.device}"]
    bf16 = [*run, "run.precision=bf16"]
    print(cuda_line() if gpu else hardware_line())
    bs = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        data = batch_folder(Path(tmp) / "photos", bs)
        dino_step = prepare(bf16, data, Path(tmp) / "bf16")
        ips, gflop = images_per_s([dino_step], args.steps)[0], dino_step.gflop
        if gpu:
            print(f"ssl-distill bf16, CUDA fused attention, batch {bs}: {ips:.1f} images/s  ({gflop:.0f} GFLOP/step, "
                  f"{gflop * ips / bs / 1e3:.1f} TFLOP/s achieved)")
        else:
            bf16_peak = gemm_gflops(torch.bfloat16)
            print(f"ssl-distill bf16, plain attention: {ips:.2f} images/s  ({gflop:.0f} GFLOP/step, "
                  f"{gflop * ips / bs:.0f} GFLOP/s achieved = {100 * gflop * ips / bs / bf16_peak:.0f}% of the bf16 GEMM "
                  f"peak {bf16_peak:.0f} GFLOP/s; issue 28's target >= 75%)")
        if not args.skip_fp32 and not gpu:
            ips32, _ = measure([*run, "run.precision=fp32", "model.fused_attn=true"], data, Path(tmp) / "fp32",
                               args.steps)
            fp32_peak = gemm_gflops(torch.float32)
            print(f"ssl-distill fp32, fused attention (the precision official DINO runs in on a CPU): {ips32:.2f} "
                  f"images/s  ({gflop * ips32 / bs:.0f} GFLOP/s achieved; fp32 GEMM peak {fp32_peak:.0f} GFLOP/s)")
            print(f"bf16 over fp32: {ips / ips32:.1f}x")
        if args.dino_repo is not None:
            official_rows(dino_step, args.dino_repo, bs, max(args.steps, 4))
        if args.objectives:  # every objective's step again, interleaved with DINO's: fair ratios
            boxes = photo_boxes(data)
            runs = {"DINO": dino_step,
                    "iBOT": prepare([*bf16, *IBOT], data, Path(tmp) / "ibot"),
                    "AttMask": prepare([*bf16, *ATTMASK], data, Path(tmp) / "attmask"),
                    "recipe": prepare(bf16, data, Path(tmp) / "ibot_recipe",
                                      recipe="ibot_vit_small16.yaml"),
                    "ODIS": prepare([*bf16, *ODIS, f"data.boxes={boxes}"], data, Path(tmp) / "odis")}
            speed = dict(zip(runs, images_per_s(list(runs.values()), max(args.steps, 4))))
            dino, ibot = speed["DINO"], speed["iBOT"]
            print(f"interleaved, fastest of {max(args.steps, 4)} steps each: DINO {dino:.2f} images/s")
            print(f"iBOT (DINO's head + patch term): {ibot:.2f} images/s, step {dino / ibot:.2f}x DINO's "
                  f"({runs['iBOT'].gflop:.0f} GFLOP/step; target <= 1.3x)")
            print(f"AttMask-High (same head): {speed['AttMask']:.2f} images/s, step {ibot / speed['AttMask']:.2f}x "
                  f"iBOT's (target <= 1.05x)")
            print(f"iBOT ViT-S/16 recipe (out_dim 8192): {speed['recipe']:.2f} images/s, step "
                  f"{dino / speed['recipe']:.2f}x DINO's")
            print(f"ODIS (iBOT + [OBJ] term, no [CLS] term, same head, object-aware crops): {speed['ODIS']:.2f} "
                  f"images/s, step {ibot / speed['ODIS']:.2f}x iBOT's ({runs['ODIS'].gflop:.0f} GFLOP/step; "
                  f"target <= 1.1x)")
        if args.dinov3:
            runs = {"learned": prepare([*bf16, *DINOV3_TERMS], data, Path(tmp) / "learned"),
                    "learned_reg": prepare([*bf16, *DINOV3_TERMS, *REG_LS], data, Path(tmp) / "learned_reg"),
                    "rope": prepare([*bf16, *DINOV3_TERMS, *ROPE], data, Path(tmp) / "rope")}
            speed = dict(zip(runs, images_per_s(list(runs.values()), max(args.steps, 4))))
            print(f"DINOv3's objectives (no Gram), interleaved, fastest of {max(args.steps, 4)} steps each: "
                  f"learned-position ViT-S/16 {speed['learned']:.2f} images/s ({runs['learned'].gflop:.0f} GFLOP/step)")
            print(f"RoPE ViT-S/16 (DINOv3: 4 registers, LayerScale): {speed['rope']:.2f} images/s, step "
                  f"{speed['learned'] / speed['rope']:.3f}x the learned-position one's ({runs['rope'].gflop:.0f} "
                  f"GFLOP/step; target <= 1.05x); {speed['learned_reg'] / speed['rope']:.3f}x that of the "
                  f"learned-position ViT with 4 registers and LayerScale ({speed['learned_reg']:.2f} images/s)")
    if gpu:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    else:
        print(f"target: >= 2.0 images/s; peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
