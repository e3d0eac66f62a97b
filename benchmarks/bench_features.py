"""Feature extraction throughput of ViT-S/16 at 224 px on this CPU: fp32 vs bf16.

Target: bf16 at least 2x the fp32 images/s.

Measured through :func:`ssl_distill.models.frozen_features.prepare_inference`, the path every evaluation uses
(fp32: fused attention; bf16 on CPU: a bfloat16 copy of the model), on batches of random images
(model only), in alternating rounds because the machine is shared; both wall-clock images/s and
images per CPU-second of this process (less sensitive to other processes) are printed, best round.
For reference, bf16 autocast (LayerNorm in float32) is timed too. With ``--folder-images N`` the
end-to-end :func:`extract_folder` (JPEG decode, resize, crop, model) runs on N generated images.

    python benchmarks/bench_features.py [--batch 32] [--rounds 3] [--layout cls] [--n-last-blocks 1]
                                        [--threads 0] [--folder-images 0]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ssl_distill.eval.features import ImageSettings, extract_folder
from ssl_distill.hardware import hardware_line
from ssl_distill.models import BackboneSpec, ViTBackbone
from ssl_distill.models.frozen_features import FeatureExtractor, FeatureSpec, prepare_inference


def timed(fn, x: torch.Tensor) -> tuple[float, float]:  # noqa: ANN001
    """(wall seconds, CPU seconds of this process) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn(x)
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layout", default="cls")
    p.add_argument("--n-last-blocks", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--folder-images", type=int, default=0, help="also time extract_folder on N generated JPEGs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(hardware_line(), flush=True)
    torch.manual_seed(0)
    spec = FeatureSpec(args.layout, args.n_last_blocks)
    extractor = FeatureExtractor(ViTBackbone(BackboneSpec(arch="vit_small", patch_size=16, img_size=224)), spec).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    runners = {}
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16")):
        model, amp = prepare_inference(extractor, precision, "cpu")
        runners[name] = (model, amp)
    autocast_model = FeatureExtractor(ViTBackbone(BackboneSpec(arch="vit_small")), spec).eval()
    autocast_model.load_state_dict(extractor.state_dict())
    autocast_model.backbone.set_fused_attn(True)

    def call(name: str, t: torch.Tensor) -> tuple[float, float]:
        with torch.inference_mode():
            if name == "bf16-autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return timed(autocast_model, t)
            return timed(runners[name][0], t)

    names = ("fp32", "bf16", "bf16-autocast")
    with torch.inference_mode():
        ref = runners["fp32"][0](x[:4]).float()
        for name in ("bf16",):
            cos = torch.nn.functional.cosine_similarity(ref, runners[name][0](x[:4]).float(), dim=1).min()
            print(f"{name} features vs fp32: min cosine similarity {float(cos):.4f}")
    for name in names:  # warm-up
        call(name, x)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    print(f"\nViT-S/16, 224 px, layout {spec.name()}, batch {args.batch}, torch threads {torch.get_num_threads()}")
    for r in range(args.rounds):
        line = []
        for name in names:
            w, c = call(name, x)
            wall[name].append(args.batch / w)
            cpu[name].append(args.batch / c)
            line.append(f"{name} {args.batch / w:.1f} img/s ({args.batch / c:.1f} img/cpu-s)")
        print(f"  round {r}: " + " | ".join(line), flush=True)
    best = {n: (max(wall[n]), max(cpu[n])) for n in names}
    for name in names:
        print(f"  {name:14s} best {best[name][0]:6.1f} images/s wall, {best[name][1]:6.1f} images per CPU-second")
    ratios = [b / f for b, f in zip(wall["bf16"], wall["fp32"])]
    print(f"  bf16 / fp32: best-vs-best wall {best['bf16'][0] / best['fp32'][0]:.2f}x, per CPU-second "
          f"{best['bf16'][1] / best['fp32'][1]:.2f}x, median per-round wall {sorted(ratios)[len(ratios) // 2]:.2f}x "
          f"(target >= 2x); autocast bf16: {best['bf16-autocast'][0] / best['fp32'][0]:.2f}x wall", flush=True)

    if args.folder_images:
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            rng = np.random.default_rng(0)
            for i in range(args.folder_images):
                d = Path(tmp) / f"c{i % 4}"
                d.mkdir(exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
            for precision in ("fp32", "bf16"):
                fs = extract_folder(extractor, tmp, ImageSettings(224, 256), precision=precision,
                                    batch_size=args.batch, num_workers=0)
                print(f"  extract_folder {precision}: {fs.meta['images_per_s']:.1f} images/s "
                      f"({args.folder_images} JPEGs 400x300, decode + resize + crop + model, 0 workers)", flush=True)
    print(hardware_line())


if __name__ == "__main__":
    main()
