"""ODIS where its claim can show (issue 26): Fashion-MNIST items on black canvases, 1, 2 and 4 per canvas,
crops chosen so that plain global pairs disagree on the dominant item and ODIS's pairs do not
(configs/odis_tiny_scenes4.yaml says what was chosen and why).

Pass criterion, stated before any run: ODIS - iBOT > 2 sd over seeds on evaluations (1) and (2) at 2 and 4
items, and about 0 (within 2 sd) at 1 item. The table is written whatever it shows; a clear negative where
DINO and iBOT visibly learn (evaluation (2) well above random init) is a result too.

Runs (each ``configs/odis_tiny_scenes4.yaml`` with the overrides of :data:`METHODS`, one wall-clock budget
from its step time, or ``--steps``): DINO, iBOT, ODIS on the true boxes, and the paper's two ablations,
cropping only ([CLS] and patch terms on object-aware crops, no [OBJ]: ``odis.ablation=cropping_only``) and
masking only ([OBJ] on plain crops: ``odis.ablation=masking_only``); ``--seeds``; ``--items 1 2 4``.

Evaluations (``ssl-distill object-knn``, k = 20, T = 0.07, teacher):
(1) image level: Fashion-MNIST test items each centred alone on the same black canvas, classified from train
    items so placed: [CLS] of the canvas (mode ``scene``) for every model, and for models with [OBJ] its output
    with the item's box mask (``obj`` on ``items/``) and with every patch (``obj`` on ``items_whole/``, whose
    box is the whole canvas);
(2) object level on the multi-item test canvases: [OBJ] + box mask (``obj``) against [CLS] of the box crop
    pasted at the canvas's scale on a black canvas (``crop_native``: the item as large as in the scene, as the
    centred items of (1) are, not upsampled);
(3) the ODIS - iBOT gap per item count beside the plain pairs' disagreement rate (``--stats``' first figure).

Modes:
  --stats   prints, before any training, the crop statistics of each item count
            (:mod:`ssl_distill.data.crop_stats`), and exits;
  --cheap   starts iBOT and ODIS from a Fashion-MNIST demo run (``--init``, default runs/fmnist_demo) and
            continues on 4-item canvases (or ``--items``) for ``--steps`` (300), the online k-NN of (1) every
            ``--knn-every`` (50) steps
            ([CLS] for iBOT, all-patch [OBJ] for ODIS), then (2); the paper's mechanism predicts iBOT's
            curve drifts down while ODIS's holds;
  default   the whole grid (``--parallel N`` on a GPU with ``--set run.device=cuda``).

Usage: python experiments/odis_benchmark.py [--stats | --cheap] [--items 1 2 4] [--seeds 0 1 2]
           [--budget-min 6 | --steps N] [--methods ...] [--out runs/odis_benchmark] [--data data]
           [--docs docs/results.md] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from compare_objectives import cli, seconds_per_step
from ssl_distill.config import load_config
from ssl_distill.data.crop_stats import crop_statistics
from ssl_distill.data.folder import scan_image_folder
from ssl_distill.data.object_crops import ObjectMultiCropTransform
from ssl_distill.hardware import hardware_line
from ssl_distill.report.docs import update_section

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "odis_tiny_scenes4.yaml"
SIZE = 56  # the canvas side (the recipe's comment)
SCENE_ARGS = ["--size", str(SIZE), "--background", "black", "--no-tint", "--min-scale", "0.35", "--max-scale", "0.5",
              "--max-overlap", "0.1"]
PLAIN = ["data.boxes=null", "data.crops.object_aware_local=false", "odis.weight=0", "dino.weight=1",
         "monitor.knn_layout=cls"]
METHODS: dict[str, list[str]] = {
    "DINO": [*PLAIN, "ibot.weight=0", "masking.shape=none"],
    "iBOT": PLAIN,
    "ODIS": [],
    "cropping only": ["odis.weight=0", "dino.weight=1", "odis.ablation=cropping_only", "monitor.knn_layout=cls"],
    "masking only": ["odis.ablation=masking_only"],
}
HAS_OBJ = ("ODIS", "masking only")
SECTION = "experiments/odis_benchmark.py"


# ------------------------------------------------------------------------------------------------- data
def write_items(src: Path, out: Path, n: int, seed: int, whole: bool) -> None:
    """``out``: the first ``n`` images (seeded draw) of the labeled folder ``src``, each centred alone on a black
    ``SIZE`` canvas at native scale, in ``<class>/`` folders, with a COCO ``boxes.json`` (the item's box, or the
    whole canvas with ``whole``)."""
    files = scan_image_folder(src, labeled=True)
    pick = np.sort(np.random.default_rng(seed).permutation(len(files))[: min(n, len(files))])
    images, annotations = [], []
    for i in pick.tolist():
        item = Image.open(Path(files.root) / files.paths[i]).convert("L")
        canvas = Image.new("L", (SIZE, SIZE))
        left, top = (SIZE - item.width) // 2, (SIZE - item.height) // 2
        canvas.paste(item, (left, top))
        name = f"{files.classes[files.labels[i]]}/{Path(files.paths[i]).stem}.png"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        canvas.convert("RGB").save(out / name)
        ys, xs = np.nonzero(np.asarray(item) > 0.12 * 255)
        box = [0, 0, SIZE, SIZE] if whole or not len(xs) else [left + int(xs.min()), top + int(ys.min()),
                                                               int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1]
        images.append({"id": len(images) + 1, "file_name": name, "width": SIZE, "height": SIZE})
        annotations.append({"id": len(annotations) + 1, "image_id": len(images), "bbox": box, "iscrowd": 0,
                            "category_id": int(files.labels[i]) + 1, "area": box[2] * box[3]})
    categories = [{"id": j + 1, "name": c} for j, c in enumerate(files.classes)]
    (out / "boxes.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                "categories": categories}))


def prepare(data: Path, fmnist: Path, items: list[int], n_train: int, n_test: int, n_items: int) -> None:
    """``data/scenes{k}`` (make-scenes, k items each) and ``data/items{,_whole}/{train,test}``, when absent."""
    for k in items:
        if not (data / f"scenes{k}" / "test" / "boxes.json").is_file():
            cli("make-scenes", str(fmnist / "train"), str(data / f"scenes{k}"), "--n-train", str(n_train),
                "--n-test", str(n_test), "--min-objects", str(k), "--max-objects", str(k), *SCENE_ARGS)
    for name, whole in (("items", False), ("items_whole", True)):
        for split, src, n in (("train", "train", n_items), ("test", "val", max(1, n_items // 2))):
            if not (data / name / split / "boxes.json").is_file():
                write_items(fmnist / src, data / name / split, n, seed=split == "test", whole=whole)


def scene_images(boxes_json: Path) -> list[tuple[int, int, np.ndarray]]:
    """(width, height, float (n, 4) xyxy) per image of a COCO boxes file."""
    d = json.loads(boxes_json.read_text())
    by: dict[int, list[list[float]]] = {im["id"]: [] for im in d["images"]}
    for a in d["annotations"]:
        x, y, w, h = a["bbox"]
        by[a["image_id"]].append([x, y, x + w, y + h])
    return [(im["width"], im["height"], np.array(by[im["id"]], dtype=np.float64).reshape(-1, 4)) for im in d["images"]]


def stats(data: Path, items: list[int], n: int, overrides: list[str]) -> dict[int, dict[str, float]]:
    """The crop statistics of the recipe on each ``scenes{k}/train`` (printed, and returned per k)."""
    cfg = load_config(RECIPE, overrides)
    transform = ObjectMultiCropTransform(cfg.data.crops, cfg.model.patch_size, cfg.odis.target_box, cfg.odis.no_box)
    out = {}
    for k in items:
        st = crop_statistics(transform, scene_images(data / f"scenes{k}" / "train" / "boxes.json"), n, seed=0)
        print(f"{k} item(s) per canvas: {st.line()}", flush=True)
        out[k] = st.as_dict()
    return out


# --------------------------------------------------------------------------------------------- runs
def evaluate(run: Path, data: Path, k: int, has_obj: bool) -> dict[str, float]:
    """Evaluations (1) and (2) of one run (module docstring)."""
    def knn(scenes: Path, mode: str, name: str) -> float:
        out = run / f"{name}.json"
        cli("object-knn", str(run), "--scenes", str(scenes), "--mode", mode, "--out", str(out), "--image-size",
            str(SIZE), "--batch-size", "256")
        return json.loads(out.read_text())["accuracy"][mode]["top1"]

    row = {"image_cls": knn(data / "items", "scene", "eval1_cls"),
           "object_crop": knn(data / f"scenes{k}", "crop_native", "eval2_crop_native")}
    if has_obj:
        row |= {"image_obj_box": knn(data / "items", "obj", "eval1_obj_box"),
                "image_obj_all": knn(data / "items_whole", "obj", "eval1_obj_all"),
                "object_obj": knn(data / f"scenes{k}", "obj", "eval2_obj")}
    return row


def train(method: str, k: int, seed: int, out: Path, data: Path, extra: list[str], epochs: float) -> dict:
    run = out / f"items{k}" / f"seed{seed}" / method.replace(" ", "_")
    scenes = data / f"scenes{k}" / "train"
    cli("train", str(RECIPE), f"data.train_dir={scenes}", f"data.boxes={scenes / 'boxes.json'}",
        f"knn.train_dir={data / 'items' / 'train'}", f"knn.val_dir={data / 'items' / 'test'}", *METHODS[method],
        *extra, f"run.seed={seed}", f"optim.epochs={epochs}", f"run.output_dir={run}", "run.progress=false", "--fresh")
    return {"method": method, "items": k, "seed": seed, "epochs": epochs,
            **evaluate(run, data, k, method in HAS_OBJ)}


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(rows: list[dict], disagree: dict[int, dict[str, float]], hardware: str, budget: str) -> str:
    """The Markdown table: one line per (items, method), the gap lines, the pass verdict per item count."""
    cols = ("image_cls", "image_obj_box", "image_obj_all", "object_obj", "object_crop")
    lines = [f"ODIS benchmark (black canvases, {SIZE} px), {budget}; {hardware}", "",
             "| items | plain pairs disagree | method | (1) [CLS] | (1) [OBJ] box | (1) [OBJ] all | (2) [OBJ] box | "
             "(2) [CLS] native crop |", "|---|---|---|---|---|---|---|---|"]
    for k in sorted({r["items"] for r in rows}):
        dis = disagree.get(k, {}).get("plain_disagree")
        for method in METHODS:
            rs = [r for r in rows if r["items"] == k and r["method"] == method]
            if rs:
                cells = [_cell([r[c] for r in rs if c in r]) for c in cols]
                lines.append(f"| {k} | {'-' if dis is None else f'{100 * dis:.0f}%'} | {method} | " + " | ".join(cells)
                             + " |")
        lines += gap_lines(rows, k)
    return "\n".join(lines)


def gap_lines(rows: list[dict], k: int) -> list[str]:
    """(3): ODIS - iBOT per seed on (1) (ODIS's box-masked [OBJ] against iBOT's [CLS]) and (2) (both [OBJ] box
    against [CLS] crop: ODIS's [OBJ] against iBOT's crop), mean ± sd, and the criterion's verdict; then the same
    gaps with one read-out for both models ([CLS] of the canvas on (1), of the crop on (2))."""
    by = {(r["method"], r["seed"]): r for r in rows if r["items"] == k}
    seeds = sorted(s for m, s in by if m == "ODIS" and ("iBOT", s) in by)
    if not seeds:
        return []
    g1 = [by["ODIS", s]["image_obj_box"] - by["iBOT", s]["image_cls"] for s in seeds]
    g2 = [by["ODIS", s]["object_obj"] - by["iBOT", s]["object_crop"] for s in seeds]
    # the same read-out for both ([CLS] of the canvas, [CLS] of the native-scale crop): what training changed
    # apart from the [OBJ] token and its box mask
    s1 = [by["ODIS", s]["image_cls"] - by["iBOT", s]["image_cls"] for s in seeds]
    s2 = [by["ODIS", s]["object_crop"] - by["iBOT", s]["object_crop"] for s in seeds]

    def verdict(g: list[float]) -> str:
        if len(g) < 2:
            return "one seed"
        m, sd = statistics.mean(g), statistics.stdev(g)
        return ("ODIS ahead" if m > 2 * sd else "ODIS behind" if m < -2 * sd else "no difference") + " (2 sd)"

    return [f"| {k} | | ODIS - iBOT | {_cell(g1)} ({verdict(g1)}) | | | {_cell(g2)} ({verdict(g2)}) | |",
            f"| {k} | | ODIS - iBOT, both [CLS] | {_cell(s1)} ({verdict(s1)}) | | | | {_cell(s2)} ({verdict(s2)}) |"]


def curves(rows: list[dict], out: Path, every: int) -> str:
    """--cheap: each run's online k-NN of (1) (its log's ``knn`` records), one line per run."""
    from ssl_distill.report import read_run

    lines = []
    for r in rows:
        run = out / f"items{r['items']}" / f"seed{r['seed']}" / r["method"].replace(" ", "_")
        curve = [round(x["knn_top1_k20"], 1) for x in read_run(run).knn if "knn_top1_k20" in x]
        lines.append(f"online k-NN (1) of {r['method']}, {r['items']} item(s), seed {r['seed']}, every {every} steps: "
                     f"{' -> '.join(map(str, curve))}")
    return "\n\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stats", action="store_true", help="print the crop statistics and exit (no training)")
    ap.add_argument("--cheap", action="store_true",
                    help="iBOT and ODIS (or --methods) from a demo model on 4 items (or --items) (CPU)")
    ap.add_argument("--init", default=str(ROOT / "runs" / "fmnist_demo"), help="--cheap: the demo run to start from")
    ap.add_argument("--items", type=int, nargs="+", default=None, help="items per canvas (default 1 2 4; --cheap: 4)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                    help="default all; --cheap: iBOT ODIS")
    ap.add_argument("--knn-every", type=int, default=50, help="--cheap: steps between online k-NN evaluations")
    ap.add_argument("--budget-min", type=float, default=6.0, help="training wall-clock per run, minutes")
    ap.add_argument("--steps", type=int, default=None, help="train this many steps instead of the budget")
    ap.add_argument("--n-train", type=int, default=2000, help="scenes per item count")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--n-items", type=int, default=5000, help="centred train items of (1) (half as many test)")
    ap.add_argument("--stats-samples", type=int, default=1000)
    ap.add_argument("--data", default=str(ROOT / "data"), help="writes scenes{k}, items, items_whole here")
    ap.add_argument("--fmnist", default=str(ROOT / "data" / "fmnist"), help="labeled train/ and val/ folders of items")
    ap.add_argument("--out", default=str(ROOT / "runs" / "odis_benchmark"))
    ap.add_argument("--docs", default=None, help="also write the table into this Markdown file (its section)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (a GPU)")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    items, methods = ([4], ["iBOT", "ODIS"]) if args.cheap else ([1, 2, 4], list(METHODS))  # the defaults
    args.items, args.methods = args.items or items, args.methods or methods
    if args.cheap:
        args.steps = args.steps or 300
    hardware = hardware_line()
    print(hardware, flush=True)
    prepare(data, Path(args.fmnist), args.items, args.n_train, args.n_test, args.n_items)
    disagree = stats(data, args.items, args.stats_samples, args.set)
    if args.stats:
        return
    extra = list(args.set)
    if args.cheap:
        extra += [f"model.init_from={args.init}", f"monitor.knn_every_steps={args.knn_every}", "monitor.knn_train_size=0",
                  "monitor.knn_val_size=0"]
    jobs = [(m, k, s) for k in args.items for s in args.seeds for m in args.methods]
    epochs: dict[tuple[str, int], float] = {}
    for m, k, _ in jobs:
        if (m, k) not in epochs:
            over = [f"data.train_dir={data / f'scenes{k}' / 'train'}",
                    f"data.boxes={data / f'scenes{k}' / 'train' / 'boxes.json'}", *METHODS[m], *extra]
            if args.steps is None:
                sec, iters, _ = seconds_per_step(str(RECIPE), over)
                epochs[m, k] = round(args.budget_min * 60 / (sec * iters), 3)
            else:
                iters = len(scan_image_folder(data / f"scenes{k}" / "train", labeled=False)) // load_config(
                    RECIPE, over).data.batch_size
                epochs[m, k] = round(args.steps / max(iters, 1), 4)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        rows = list(pool.map(lambda j: train(*j, out, data, extra, epochs[j[0], j[1]]), jobs))
    budget = f"{args.steps} steps each" if args.steps else f"{args.budget_min:g} min of training each"
    text = table(rows, disagree, hardware, budget + (f", from {args.init}" if args.cheap else ""))
    if args.cheap:
        text += "\n\n" + curves(rows, out, args.knn_every)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps({"hardware": hardware, "rows": rows, "stats": disagree}, indent=2))
    (out / "table.md").write_text(text + "\n")
    if args.docs:
        update_section(args.docs, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
