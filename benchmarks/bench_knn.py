"""k-NN evaluation speed against the machine's GEMM ceiling.

Target: the whole ``knn_classify`` (ks = 10, 20, 100, 200) on 60,000 train x 10,000 test features of
dimension 384 takes at most 3x one fp32 GEMM (10000 x 384) @ (384 x 60000) measured in this process.

Printed per dataset: the default engine (faiss) and the torch engine (chunked mm + topk), a DINO-style
reference (one ``knn_classifier`` call per k: chunks of 100 test images, full similarity, topk, one-hot
weighted votes), and a bf16 first stage + fp32 re-scoring prototype with the number of queries whose
neighbours differ from the exact search. The machine is shared and its speed drifts, so GEMM and k-NN
timings alternate in rounds and the ratio is taken within a round and between the best times. Peak RSS
is read before the first GEMM (whose 2.4 GB output would dominate it) and at the end.

    python benchmarks/bench_knn.py [--n-train 60000 --n-test 10000 --dim 384 --classes 10] [--rounds 3]
                                   [--skip-reference] [--skip-bf16]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_distill.hardware import gemm_seconds, hardware_line, peak_rss_mib
from ssl_distill.weighted_knn import knn_classify, search_neighbours

KS = (10, 20, 100, 200)
T = 0.07


def make_features(n: int, m: int, d: int, c: int, noise: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gaussian class means (unit scale per coordinate) + isotropic Gaussian noise of std ``noise``."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=g)
    ytr = torch.randint(0, c, (n,), generator=g)
    yte = torch.randint(0, c, (m,), generator=g)
    xtr = means[ytr] + noise * torch.randn(n, d, generator=g)
    xte = means[yte] + noise * torch.randn(m, d, generator=g)
    return xtr, ytr, xte, yte


def dino_reference(train: Tensor, train_y: Tensor, test: Tensor, test_y: Tensor, k: int, c: int) -> tuple[float, float]:
    """DINO's knn_classifier as described in the paper's code: one call per k, 100 test images per chunk."""
    train_t = F.normalize(train, dim=1).t().contiguous()
    test = F.normalize(test, dim=1)
    top1 = top5 = 0
    one_hot = torch.zeros(100 * k, c)
    for s in range(0, test.shape[0], 100):
        feats, targets = test[s : s + 100], test_y[s : s + 100]
        b = feats.shape[0]
        dist, idx = torch.mm(feats, train_t).topk(k, dim=1, largest=True, sorted=True)
        neighbours = torch.gather(train_y.view(1, -1).expand(b, -1), 1, idx)
        one_hot.resize_(b * k, c).zero_()
        one_hot.scatter_(1, neighbours.view(-1, 1), 1)
        probs = (one_hot.view(b, k, c) * dist.div(T).exp_().view(b, k, 1)).sum(1)
        _, pred = probs.sort(1, True)
        correct = pred.eq(targets.view(-1, 1))
        top1 += correct.narrow(1, 0, 1).sum().item()
        top5 += correct.narrow(1, 0, min(5, k, c)).sum().item()
    return 100.0 * top1 / test.shape[0], 100.0 * top5 / test.shape[0]


def bf16_prototype(train: Tensor, test: Tensor, k: int, margin: int = 56, chunk: int = 1000) -> tuple[Tensor, int]:
    """bf16 similarity -> top (k + margin) candidates -> exact fp32 re-scoring -> top k (normalized inputs).

    Returns (M, k) indices and the number of queries whose result the bf16 error bound cannot certify
    (k-th exact score not above the best excluded bf16 score + bound).
    """
    bound = 3 * 2.0**-8 + train.shape[1] * 2.0**-23  # input rounding (2u), bf16 output rounding (u), fp32 sums
    train_b, test_b = train.bfloat16(), test.bfloat16()
    out, uncertified = [], 0
    for s in range(0, test.shape[0], chunk):
        sim = torch.mm(test_b[s : s + chunk], train_b.t())
        v, cand = sim.topk(k + margin + 1, dim=1)
        cand = cand[:, : k + margin]
        exact = torch.bmm(train[cand], test[s : s + chunk, :, None]).squeeze(2)
        ev, ej = exact.topk(k, dim=1)
        uncertified += int((ev[:, -1] <= v[:, -1].float() + bound).sum())
        out.append(cand.gather(1, ej))
    return torch.cat(out), uncertified


def timed(fn, *args, **kwargs):  # noqa: ANN001, ANN201
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def differing_rows(a: Tensor, b: Tensor, k: int) -> int:
    """Queries whose sets of k nearest indices differ between two (M, >=k) results."""
    sa, _ = a[:, :k].sort(dim=1)
    sb, _ = b[:, :k].sort(dim=1)
    return int((sa != sb).any(dim=1).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of GEMM / faiss / torch timings")
    p.add_argument("--check-queries", type=int, default=2000, help="queries used for the neighbour comparison")
    p.add_argument("--skip-reference", action="store_true", help="skip the DINO-style reference (slow)")
    p.add_argument("--skip-bf16", action="store_true", help="skip the bf16 first-stage prototype")
    args = p.parse_args()
    n, m, d, c = args.n_train, args.n_test, args.dim, args.classes

    print(hardware_line(), flush=True)
    print(f"features: train {n} x test {m} x dim {d}, {c} classes, ks={KS}, T={T}", flush=True)
    datasets = {"realistic": 5.0, "clustered": 0.5}  # noise std; class means ~ N(0, 1) per coordinate
    data = {name: make_features(n, m, d, c, noise, seed=0) for name, noise in datasets.items()}

    # First pass (also the warm-up): peak memory of knn_classify alone, before any full-size GEMM output.
    xtr, ytr, xte, yte = data["realistic"]
    res_f = knn_classify(xtr, ytr, xte, yte, ks=KS, engine="faiss")
    rss_faiss = peak_rss_mib()
    res_t = knn_classify(xtr, ytr, xte, yte, ks=KS, engine="torch")
    rss_torch = peak_rss_mib()

    # The machine is shared and its speed drifts: alternate GEMM and k-NN timings, compare within a round.
    print(f"\nalternating rounds on 'realistic' (GEMM = one fp32 ({m}x{d}) @ ({d}x{n}), preallocated output)")
    times: dict[str, list[float]] = {"gemm": [], "faiss": [], "torch": []}
    for r in range(args.rounds):
        times["gemm"].append(gemm_seconds(m, d, n, torch.float32, repeats=1))
        times["faiss"].append(timed(knn_classify, xtr, ytr, xte, yte, ks=KS, engine="faiss")[0])
        times["torch"].append(timed(knn_classify, xtr, ytr, xte, yte, ks=KS, engine="torch")[0])
        g = times["gemm"][-1]
        print(f"  round {r}: GEMM {g:.2f} s | knn_classify faiss {times['faiss'][-1]:.2f} s "
              f"({times['faiss'][-1] / g:.2f}x) | torch {times['torch'][-1]:.2f} s ({times['torch'][-1] / g:.2f}x)",
              flush=True)
    best = {key: min(v) for key, v in times.items()}
    ratios = {key: sorted(t / g for t, g in zip(times[key], times["gemm"])) for key in ("faiss", "torch")}
    t_gemm = best["gemm"]
    for key in ("faiss", "torch"):
        print(f"  knn_classify engine={key}: best {best[key]:.2f} s = {best[key] / t_gemm:.2f}x best GEMM "
              f"({t_gemm:.2f} s); median per-round ratio {ratios[key][len(ratios[key]) // 2]:.2f}x (target <= 3x)")
    print(f"  peak RSS: {rss_faiss:.0f} MiB after knn_classify faiss, {rss_torch:.0f} MiB after torch "
          f"(features {n * d * 4 / 2**20:.0f} + {m * d * 4 / 2**20:.0f} MiB)", flush=True)

    for name, (xtr, ytr, xte, yte) in data.items():
        if name != "realistic":
            res_f = knn_classify(xtr, ytr, xte, yte, ks=KS, engine="faiss")
            res_t = knn_classify(xtr, ytr, xte, yte, ks=KS, engine="torch")
        acc = "  ".join(f"k={k}: {res_f[f'k={k}']['top1']:.2f}/{res_f[f'k={k}']['top5']:.2f}" for k in KS)
        same = all(res_f[f"k={k}"] == res_t[f"k={k}"] for k in KS)
        print(f"\n[{name}, noise {datasets[name]}] top1/top5 %  {acc}")
        print(f"  faiss and torch engines give identical results (incl. per class): {same}")
        trn, tst = F.normalize(xtr, dim=1), F.normalize(xte[: args.check_queries], dim=1)
        _, i_f = search_neighbours(trn, tst, max(KS), engine="faiss")
        _, i_t = search_neighbours(trn, tst, max(KS), engine="torch")
        diff = {k: differing_rows(i_f, i_t, k) for k in KS}
        print(f"  k-neighbour sets faiss vs torch fp32 (first {tst.shape[0]} queries), rows differing: {diff}",
              flush=True)
        if not args.skip_reference and name == "realistic":
            t_ref, ref = timed(lambda: {k: dino_reference(xtr, ytr, xte, yte, k, c) for k in KS})  # noqa: B023
            agree = all(ref[k] == (res_f[f"k={k}"]["top1"], res_f[f"k={k}"]["top5"]) for k in KS)
            print(f"  DINO-style reference (4 calls): {t_ref:.2f} s = {t_ref / t_gemm:.2f}x best GEMM; "
                  f"same top1/top5 as knn_classify: {agree}", flush=True)
        if not args.skip_bf16:
            t_bf, (i_b, uncertified) = timed(bf16_prototype, trn, F.normalize(xte, dim=1), max(KS))
            diff_b = {k: differing_rows(i_b[: tst.shape[0]], i_t, k) for k in KS}
            print(f"  bf16 first stage + fp32 re-score (search only): {t_bf:.2f} s = {t_bf / t_gemm:.2f}x best GEMM; "
                  f"queries the bf16 error bound cannot certify: {uncertified}/{m}; "
                  f"rows differing from exact per k: {diff_b}", flush=True)

    print(f"\npeak RSS at the end: {peak_rss_mib():.0f} MiB (includes the GEMM's {m * n * 4 / 2**30:.1f} GiB output)")
    print(hardware_line())


if __name__ == "__main__":
    main()
