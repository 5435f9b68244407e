"""Memory and time per step of SlideChat training at the real settings, computed from the model's shapes.

    python benchmarks/training_memory.py [--llm-config /models/Qwen2.5-7B-Instruct/config.json] [--gpus 8]
        [--gpu-gib 80] [--visual-tokens 10240] [--text-tokens 512] [--labelled 256] [--grad-accum 8]
        [--tflops 312] [--mfu 0.4]

Parameter counts come from the modules themselves, built on the meta device (no memory, no download):
the LLM from its config (Qwen2.5-7B-Instruct's shapes by default), the LongNet slide encoder and the
projector from SlideChatConfig. Memory per GPU under DeepSpeed ZeRO-2 with bf16 (what `configs/deepspeed/
zero2.json` runs), for P parameters trained and N GPUs:

  weights          2 P              bf16 copy on every GPU (stage 1: the frozen LLM too; 4-bit: 0.5 byte each)
  gradients        2 P / N + 4 P / N   bf16 partition, and its fp32 copy while the optimizer steps
  optimizer        12 P / N         fp32 master weights + Adam's two moments, partitioned
  buckets          2 x bucket x 2 B reduce and all-gather buckets (2e8 elements each in zero2.json)
  activations      activation checkpointing: each LLM layer keeps its bf16 input [T, H]; the layer being
                   recomputed holds its intermediates [T, 6H + 2 kv + 4 I] and their gradients in bf16;
                   flash/SDPA attention keeps O(T) (no [T, T] matrix). LongNet in fp32 per layer.
  logits           labelled positions only: n x V x (2 + 4 + 4 + 2) B (bf16 logits, fp32 upcast for the
                   loss, its gradient, the bf16 gradient); the full-vocabulary alternative for comparison.

Time per micro-batch: 4 x the forward FLOPs (forward, backward = 2 forwards, and the recompute of
activation checkpointing; stage 1 skips the LLM's weight gradients: 3 x), forward = 2 x P_LLM x T
+ 2 x T^2 x H x layers for causal attention, at `--tflops` x `--mfu`. CUDA context, allocator
fragmentation and DeepSpeed's own workspaces are not modelled: keep 5-10 GiB of headroom.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False)
GIB = 2**30


def parameter_counts(llm_config: dict) -> dict[str, int]:
    """Parameters of the LLM (all, embeddings + lm_head), the LongNet encoder and the projector, from modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slidechat.longnet import LongNetEncoder
    from slidechat.model import Projector, SlideChatConfig

    config = AutoConfig.for_model(**{"model_type": "qwen2", **llm_config})
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
        scfg = SlideChatConfig()
        encoder = LongNetEncoder(scfg.longnet())
        projector = Projector(scfg.feature_dim, config.hidden_size)
    return {"llm": sum(p.numel() for p in llm.parameters()),
            "encoder": sum(p.numel() for p in encoder.parameters()),
            "projector": sum(p.numel() for p in projector.parameters())}


def activation_bytes(cfg: dict, tokens: int) -> dict[str, float]:
    """Activation memory of one micro-batch of `tokens` tokens with activation checkpointing (bf16)."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    checkpoints = layers * tokens * h * 2
    recompute = 2 * tokens * (6 * h + 2 * kv + 4 * i) * 2  # one layer's intermediates and their gradients
    # LongNet (2 layers, 512-d, FFN 1024) in fp32 over the visual tokens: q/k/v, attention, FFN, norms, x2 grads
    longnet = 2 * 2 * tokens * (3 * 512 + 512 * 4 + 1024 * 3) * 4
    return {"checkpoints": checkpoints, "recompute": recompute, "longnet": longnet}


def budget(args: argparse.Namespace) -> dict:
    cfg = dict(QWEN25_7B)
    if args.llm_config:
        cfg.update({k: v for k, v in json.loads(Path(args.llm_config).read_text()).items() if k in QWEN25_7B})
    counts = parameter_counts(cfg)
    visual = counts["encoder"] + counts["projector"]
    n, t = args.gpus, args.visual_tokens + args.text_tokens
    act = activation_bytes(cfg, t)
    v = cfg["vocab_size"]
    logits = args.labelled * v * 12
    full_logits = t * v * 12
    buckets = 2 * 2e8 * 2
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    forward = 2 * counts["llm"] * t + 2 * t * t * h * layers
    rate = args.tflops * 1e12 * args.mfu
    rows = {}
    for name, trained, frozen_bytes, passes in (
        ("stage 2, full (ZeRO-2)", counts["llm"] + visual, 0, 4),
        ("stage 1, LLM frozen bf16 (ZeRO-2)", visual, counts["llm"] * 2, 3),
        ("stage 1, LLM frozen 4-bit (one process)", visual, counts["llm"] * 0.5, 3),
    ):
        one_process = "one process" in name
        shards = 1 if one_process else n
        mem = {
            "weights": trained * 2 + frozen_bytes if not one_process else trained * 4 + frozen_bytes,
            "gradients": trained * (2 + 4) / shards if not one_process else trained * 4,
            "optimizer": trained * (12 if not one_process else 8) / shards,
            "buckets": 0 if one_process else buckets,
            "activations": sum(act.values()),
            "logits": logits,
        }
        seconds = passes * forward / rate
        rows[name] = {"memory_gib": {k: round(b / GIB, 2) for k, b in mem.items()},
                      "total_gib": round(sum(mem.values()) / GIB, 1),
                      "total_with_full_logits_gib": round((sum(mem.values()) - logits + full_logits) / GIB, 1),
                      "seconds_per_micro_batch": round(seconds, 2),
                      "seconds_per_optimizer_step": round(seconds * args.grad_accum, 1)}
    # what benchmarks/gpu_check.py's llm7b check measures: bf16 weights + bf16 gradients + activations, no optimizer
    check = counts["llm"] * 4 + sum(act.values()) + logits
    return {"llm_config": cfg, "parameters": counts, "gpus": n, "gpu_gib": args.gpu_gib, "tokens": t,
            "labelled": args.labelled, "grad_accum": args.grad_accum, "tflops": args.tflops, "mfu": args.mfu,
            "activations_gib": {k: round(b / GIB, 2) for k, b in act.items()},
            "logits_gib": {"labelled_only": round(logits / GIB, 2), "full_vocabulary": round(full_logits / GIB, 2)},
            "forward_tflop": round(forward / 1e12, 1), "rows": rows,
            "gpu_check_llm7b_peak_gib": round(check / GIB, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm-config", help="the LLM's config.json (default: Qwen2.5-7B-Instruct's shapes)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-gib", type=float, default=80)
    p.add_argument("--visual-tokens", type=int, default=10240, help="the training patch cap")
    p.add_argument("--text-tokens", type=int, default=512, help="prompt + answer tokens around the slide")
    p.add_argument("--labelled", type=int, default=256, help="answer tokens that carry a label")
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--tflops", type=float, default=312, help="dense bf16 peak per GPU (A100 312, H100 SXM 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of the peak reached")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args(argv)
    b = budget(a)
    c = b["parameters"]
    print(f"LLM {c['llm'] / 1e9:.2f}B parameters, LongNet {c['encoder'] / 1e6:.2f}M, projector "
          f"{c['projector'] / 1e6:.2f}M; {b['tokens']:,} tokens per micro-batch ({a.visual_tokens:,} visual), "
          f"{a.gpus} GPUs x {a.gpu_gib:g} GiB, accumulation {a.grad_accum}, {a.tflops:g} TFLOPS x MFU {a.mfu:g}")
    print(f"forward {b['forward_tflop']} TFLOP per micro-batch; activations {b['activations_gib']} GiB; "
          f"logits {b['logits_gib']} GiB")
    print()
    print("| run | weights | gradients | optimizer | buckets | activations | logits | total GiB/GPU | "
          "with full logits | s/micro-batch | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in b["rows"].items():
        m = r["memory_gib"]
        print(f"| {name} | {m['weights']} | {m['gradients']} | {m['optimizer']} | {m['buckets']} | {m['activations']} "
              f"| {m['logits']} | **{r['total_gib']}** | {r['total_with_full_logits_gib']} | "
              f"{r['seconds_per_micro_batch']} | {r['seconds_per_optimizer_step']} |")
    print()
    print(f"gpu_check.py llm7b (bf16 weights + gradients + activations, no optimizer) should peak near "
          f"{b['gpu_check_llm7b_peak_gib']} GiB")
    if a.json:
        Path(a.json).write_text(json.dumps(b, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
