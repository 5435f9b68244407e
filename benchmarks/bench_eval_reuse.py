"""Questions/s of benchmark evaluation: per-slide encoding reuse + batched questions vs re-encoding the slide
for every question (goal: >= 3x).

50 questions over 5 slides (10 per slide), several thousand patches per slide, the real LongNet slide
encoder settings (SlideChatConfig defaults: 2 layers, 512-d, FFN 1024, 8 heads, dilated attention over the
whole slide) and a tiny random Qwen2 LLM, so the slide encoder cost is realistic relative to generation.
Both paths run the same code (`slidechat.evaluate.generate_for_benchmark`) and must give the same answers.

    python benchmarks/bench_eval_reuse.py [--patches 6000] [--max-new-tokens 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from preprocessing.stores import FeatureStoreIndex, write_zarr_store
from slidechat.benchmarks_io import TCGA_COLUMNS, load_benchmark
from slidechat.evaluate import EvalSettings, generate_for_benchmark
from slidechat.checkpoint import new_model
from slidechat.model import SlideChatConfig
from slidechat.tiny import build_tiny_llm

CORPUS = ["What is the most likely diagnosis?", "A. adenocarcinoma B. lymphoid C. stroma D. necrosis",
          "The slide shows adenocarcinoma with irregular glands.", "Dense sheets of small lymphocytes."] * 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=5)
    p.add_argument("--questions-per-slide", type=int, default=10)
    p.add_argument("--patches", type=int, default=6000, help="patches per slide")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the numbers here")
    a = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        llm = build_tiny_llm(root / "llm", CORPUS, vocab_size=400, hidden_size=64, num_layers=2, num_heads=4)
        model = new_model(llm, SlideChatConfig(context="slide")).to(a.device).eval()
        feats_dir = root / "features"
        rng = np.random.default_rng(0)
        rows = []
        for s in range(a.slides):
            sid = f"SLIDE-{s}"
            coords = np.stack([np.arange(a.patches) % 100, np.arange(a.patches) // 100], 1).astype(np.int64) * 224
            write_zarr_store(feats_dir / f"{sid}.zarr", rng.standard_normal((a.patches, 512)).astype(np.float32),
                             coords, None, {"slide_id": sid})
            for q in range(a.questions_per_slide):
                rows.append({"ID": len(rows), "Slide": sid, "Tumor": "DEMO", "Broad Category": "Diagnosis",
                             "Narrow Category": "Demo", "Question": f"What is the most likely diagnosis ({q})?",
                             "A": "adenocarcinoma", "B": "lymphoid", "C": "stroma", "D": "necrosis", "Answer": "A"})
        pd.DataFrame(rows, columns=TCGA_COLUMNS).to_csv(root / "bench.csv", index=False)
        bench = load_benchmark(root / "bench.csv")
        finder = FeatureStoreIndex(feats_dir)
        n = len(bench.items)

        def run(reuse: bool):
            s = EvalSettings(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, reuse_slide_encoding=reuse)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = generate_for_benchmark(model, bench, finder, s, log=None)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t0, res

        run(True)  # warm-up (kernels, allocator, store reads)
        t_fast, fast = run(True)
        t_slow, slow = run(False)
    same = [fast.outputs[q]["Output"] for q in sorted(fast.outputs)] == [slow.outputs[q]["Output"] for q in sorted(slow.outputs)]
    res = {
        "questions": n, "slides": a.slides, "patches_per_slide": a.patches, "max_new_tokens": a.max_new_tokens,
        "batch_size": a.batch_size, "device": a.device,
        "reuse_batched_s": round(t_fast, 3), "reencode_each_s": round(t_slow, 3),
        "reuse_batched_q_per_s": round(n / t_fast, 3), "reencode_each_q_per_s": round(n / t_slow, 3),
        "speedup": round(t_slow / t_fast, 2), "goal_speedup": 3.0, "same_answers": same,
        "reuse_breakdown_s": {k: round(v, 3) for k, v in fast.timing.items() if k.endswith("_s")},
        "reencode_breakdown_s": {k: round(v, 3) for k, v in slow.timing.items() if k.endswith("_s")},
    }
    print(f"{n} questions over {a.slides} slides x {a.patches} patches, max_new_tokens={a.max_new_tokens}, {a.device}")
    print(f"  reuse + batched : {res['reuse_batched_q_per_s']:8.2f} questions/s ({t_fast:.1f} s)")
    print(f"  re-encode each  : {res['reencode_each_q_per_s']:8.2f} questions/s ({t_slow:.1f} s)")
    print(f"  speedup {res['speedup']:.1f}x (goal >= 3x); identical answers: {same}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
