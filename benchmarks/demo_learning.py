"""Does the demo learn? Simulated CONCH features -> demo instructions -> tiny LLM -> stage 1 + 2 -> accuracy.

Features are simulated per class (a distinct random mean direction plus noise, 50-200 patches of 512-d per
slide), so the training settings can be tuned without the slide pipeline, or taken from a real demo cohort
(--labels, --features-dir). Prints held-out multiple-choice accuracy on the demo SlideBench CSV, the
majority-letter baseline, and wall time per stage.

    python benchmarks/demo_learning.py [--work DIR] [--labels CSV --features-dir DIR]
                                       [--stage1-epochs E] [--stage2-epochs E] ...
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from preprocessing.stores import write_zarr_store
from slidechat import demo_data
from slidechat.instructions import build_instructions
from slidechat.train import TrainConfig, train

CLASSES = ("adenocarcinoma", "lymphoid", "stroma")


def make_cohort(work: Path, train_per_class: int, test_per_class: int, seed: int, signal: float) -> tuple[Path, Path]:
    """labels.csv and one Zarr store per slide with class-dependent simulated features."""
    plan = [(c, "train") for c in CLASSES for _ in range(train_per_class)]
    plan += [(c, "test") for c in CLASSES for _ in range(test_per_class)]
    random.Random(seed).shuffle(plan)
    rng = np.random.default_rng(seed)
    means = {c: rng.normal(0, 1, 512).astype(np.float32) for c in CLASSES}
    feats_dir = work / "features"
    labels = work / "labels.csv"
    work.mkdir(parents=True, exist_ok=True)
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "class_name", "split", "mpp"])
        for i, (c, split) in enumerate(plan):
            sid = f"demo-{i:03d}"
            w.writerow([sid, f"{sid}.svs", c, split, 0.25])
            n = int(rng.integers(50, 200))
            side = int(np.ceil(np.sqrt(n)))
            coords = np.array([(224 * (k % side), 224 * (k // side)) for k in range(n)], np.int64)
            x = signal * means[c][None] + rng.normal(0, 1, (n, 512)).astype(np.float32)
            write_zarr_store(feats_dir / f"{sid}.zarr", x, coords, None, {"encoder": "simulated"})
    return labels, feats_dir


def evaluate(model_dir: Path, bench_csv: Path, feats_dir: Path, llm_dir: Path) -> tuple[float, float, list[str]]:
    from preprocessing.stores import load_features
    from slidechat.checkpoint import load_model
    from slidechat.scoring import extract_answer

    model = load_model(model_dir, llm=llm_dir).eval()
    rows = list(csv.DictReader(open(bench_csv)))
    ok, outs = 0, []
    for r in rows:
        opts = {k: r[k] for k in "ABCD"}
        q = r["Question"] + "\n" + "\n".join(f"{k}. {v}" for k, v in opts.items())
        store = feats_dir / f"{r['Slide']}.zarr"
        if not store.exists():
            continue
        feats = torch.from_numpy(load_features(store).features)
        out = model.generate(feats, q, max_new_tokens=12)
        outs.append(out)
        ok += extract_answer(out, opts) == r["Answer"]
    majority = Counter(r["Answer"] for r in rows).most_common(1)[0][1] / len(rows)
    return ok / len(rows), majority, outs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/demo_learning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", help="a real demo cohort's labels.csv (with --features-dir) instead of simulated features")
    p.add_argument("--features-dir", help="the feature stores of that cohort")
    p.add_argument("--signal", type=float, default=0.3, help="class mean scale relative to unit noise")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--stage1-epochs", type=int, default=6)
    p.add_argument("--stage1-lr", type=float, default=1e-3)
    p.add_argument("--stage2-epochs", type=int, default=6)
    p.add_argument("--stage2-lr", type=float, default=1e-3)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--mc-per-slide", type=int, default=12)
    p.add_argument("--model-json", default='{"encoder_layers": 1, "encoder_ffn_dim": 256, "encoder_heads": 4}')
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest
    work = Path(args.work)
    if args.labels:
        labels, feats = Path(args.labels), Path(args.features_dir)
    else:
        labels, feats = make_cohort(work, 6, 3, args.seed, args.signal)
    paths = demo_data.make_demo_instructions(labels, work / "instr", seed=args.seed, mc_per_slide=args.mc_per_slide)
    from slidechat.tiny import build_tiny_llm

    llm = build_tiny_llm(work / "llm", paths["corpus"].read_text().splitlines(), hidden_size=args.hidden,
                         num_layers=args.layers, num_heads=args.heads, seed=args.seed)
    for stage, src in (("1", paths["stage1"]), ("2", paths["stage2"])):
        build_instructions(src, feats, work / f"stage{stage}.json", exclude_benchmarks=[paths["benchmark"]])
    model_cfg = json.loads(args.model_json)
    t0 = time.perf_counter()
    train(TrainConfig(stage=1, data=str(work / "stage1.json"), features_dir=str(feats), llm=str(llm),
                      out=str(work / "m1"), work_dir=str(work / "ck1"), lr=args.stage1_lr, epochs=args.stage1_epochs,
                      grad_accum=args.grad_accum, seed=args.seed, save_steps=10**9, model=model_cfg))
    t1 = time.perf_counter()
    train(TrainConfig(stage=2, data=str(work / "stage2.json"), features_dir=str(feats), llm=str(llm),
                      init=str(work / "m1"), out=str(work / "m2"), work_dir=str(work / "ck2"), lr=args.stage2_lr,
                      epochs=args.stage2_epochs, grad_accum=args.grad_accum, seed=args.seed, save_steps=10**9))
    t2 = time.perf_counter()
    acc, majority, outs = evaluate(work / "m2", paths["benchmark"], feats, llm)
    print(f"stage 1: {t1 - t0:.0f} s, stage 2: {t2 - t1:.0f} s")
    print(f"held-out accuracy {acc:.3f}  majority-letter baseline {majority:.3f}  margin {100 * (acc - majority):+.1f} pts")
    print("sample outputs:", outs[:4])
    return 0


if __name__ == "__main__":
    sys.exit(main())
