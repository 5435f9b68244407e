"""Slide-encoder forward time and peak memory: LongNet dilated attention vs dense full attention.

For N patches (default 1k, 4k, 16k, 38.4k) it runs SlideChat's encoder (2 layers, 512-d, 8 heads,
segments 1024..16384, ratios 1..16) over the whole slide (`context: slide`) in fp32, no grad,
and the same encoder with dense attention (one full `scaled_dot_product_attention`) where that is
affordable; the dense encoder differs only in `DilatedAttention.attend`. Each measurement runs in
its own subprocess so the peak resident memory (ru_maxrss, minus the process's baseline before the
forward) belongs to that run alone, and ours and dense alternate, round by round. Prints times,
dense/ours ratios, and the growth exponent of our time and memory (slope of log t over log N).

Goals (issue 4): growth exponent <= 1.15; >= 4x faster than dense at 16k patches on CPU.

    python benchmarks/bench_slide_encoder.py [--sizes 1024 4096 16384 38400] [--dense-max 16384]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time


def _worker(mode: str, n: int, reps: int, what: str) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    from slidechat.longnet import DilatedAttention, LongNetConfig, LongNetEncoder, dilated_attention

    torch.manual_seed(0)
    cfg = LongNetConfig()
    if what == "attention":  # the attention op alone on projected q, k, v
        q, k, v = (torch.randn(1, n, cfg.num_heads, cfg.embed_dim // cfg.num_heads) for _ in range(3))
        if mode == "dense":
            def run():
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        else:
            def run():
                return dilated_attention(q, k, v, cfg.segment_lengths, cfg.dilated_ratios)
    else:
        enc = LongNetEncoder(cfg).eval()
        if mode == "dense":
            def dense_attend(self, qkv):  # same projections, sub-LN and FFN; full attention
                b, L, _ = qkv.shape
                q, k, v = (t.transpose(1, 2) for t in qkv.view(b, L, 3, self.num_heads, self.head_dim).unbind(2))
                return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, L, -1)

            DilatedAttention.attend = dense_attend
        x = torch.randn(n, cfg.embed_dim)
        if mode == "per_patch":
            def run():
                return enc(x[:, None, :])
        else:
            def run():
                return enc(x[None])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "n": n, "what": what, "time_s": min(times), "peak_mib": (peak - base) / 1024,
            "threads": torch.get_num_threads()}


def _run(mode: str, n: int, reps: int, what: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, str(n), str(reps), what]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _interleaved(modes: list[str], n: int, rounds: int, what: str) -> dict[str, dict]:
    """Fastest time and smallest peak of each mode over `rounds` rounds that alternate the modes.

    Alternating puts ours and dense into the same stretches of machine time, so a slow spell of a
    shared machine slows both instead of one side of the ratio. Each run is a fresh process that
    calls the forward more than once and keeps its fastest call: the first call of a process also
    pays for faulting in fresh memory, which later calls (the next slide) reuse.
    """
    inner = 2 if n >= 16384 else 3
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for mode in modes:
            r = _run(mode, n, inner, what)
            b = best.setdefault(mode, dict(r))
            b["time_s"], b["peak_mib"] = min(b["time_s"], r["time_s"]), min(b["peak_mib"], r["peak_mib"])
    return best


def _slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, n, reps, what = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        print(json.dumps(_worker(mode, n, reps, what)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 38400])
    p.add_argument("--dense-max", type=int, default=16384,
                   help="largest N for dense attention (38.4k dense takes minutes of CPU; memory would fit "
                        "with the flash kernel, time is what rules it out on 2 cores)")
    p.add_argument("--reps", type=int, default=3,
                   help="rounds; each runs ours and dense once, alternately, and the fastest of each counts")
    p.add_argument("--what", choices=["encoder", "attention"], default="encoder")
    a = p.parse_args()

    print(f"slide encoder benchmark ({a.what}): LongNet_2_layers_512_dim, fp32, CPU, no grad")
    print(f"{'N':>7} {'ours s':>9} {'ours MiB':>9} {'dense s':>9} {'dense MiB':>10} {'dense/ours':>11}")
    ours_t, ours_m, ns = [], [], []
    ratios = {}
    for n in a.sizes:
        modes = ["slide", "dense"] if n <= a.dense_max else ["slide"]
        best = _interleaved(modes, n, a.reps, a.what)
        o = best["slide"]
        ns.append(n)
        ours_t.append(o["time_s"])
        ours_m.append(o["peak_mib"])
        if "dense" in best:
            d = best["dense"]
            ratios[n] = d["time_s"] / o["time_s"]
            dense = f"{d['time_s']:9.3f} {d['peak_mib']:10.1f} {ratios[n]:10.2f}x"
        else:
            dense = f"{'skipped':>9} {'':>10} {'':>11}  (N > --dense-max: dense is O(N^2) time)"
        print(f"{n:7d} {o['time_s']:9.3f} {o['peak_mib']:9.1f} {dense}", flush=True)
    if len(ns) > 1:
        te = _slope(ns, ours_t)
        big = [(n, m) for n, m in zip(ns, ours_m) if n >= 4096]
        me = _slope([n for n, _ in big], [m for _, m in big]) if len(big) > 1 else float("nan")
        print(f"growth exponent, ours: time {te:.3f} (goal <= 1.15), peak memory {me:.3f} (N >= 4096)")
    if 16384 in ratios:
        r = ratios[16384]
        print(f"speed-up over dense at 16384 patches: {r:.2f}x (goal >= 4x)")
    if a.what == "encoder" and max(ns) >= 38400:
        pp = _run("per_patch", 38400, 1, "encoder")
        print(f"per_patch context (released SlideChat behaviour), N=38400: {pp['time_s']:.3f} s, {pp['peak_mib']:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
