"""Time one stage-2 optimizer step (forward, backward, clip, AdamW) for slides of 1k, 4k and 16k patches.

CPU (default): the tiny Qwen2-shaped LLM (hidden 64, 2 layers) behind the full-size SlideChat slide encoder
(LongNet, 2 layers, 512-d), fp32. With CUDA (`--gpu`): a random 0.5B-parameter Qwen2-shaped LLM
(Qwen2.5-0.5B dimensions) as `slidechat train` runs it: fp32 weights under bf16 autocast, gradient
checkpointing. Each size runs in its own process so that the peak memory (max RSS on CPU,
torch.cuda.max_memory_allocated on GPU) belongs to that size alone.

    python benchmarks/bench_train_step.py [--sizes 1024 4096 16384] [--gpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TEXT_TOKENS = 96  # prompt + answer around the slide
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0,
                tie_word_embeddings=True)


def build_model(gpu: bool, workdir: Path):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from slidechat.model import SlideChat, SlideChatConfig
    from slidechat.tiny import build_tiny_llm

    tiny = build_tiny_llm(workdir / "llm", ["a whole slide image of tissue with glands and stroma"] * 4,
                          vocab_size=300, hidden_size=64, num_layers=2, num_heads=4)
    tok = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    if gpu:
        llm = Qwen2ForCausalLM(Qwen2Config(**QWEN_05B))
    else:
        llm = Qwen2ForCausalLM.from_pretrained(tiny)
    model = SlideChat(llm, tok, SlideChatConfig(max_patches_train=10**6))
    if gpu:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def one_size(n: int, gpu: bool, steps: int) -> dict:
    from slidechat.template import IMAGE_TOKEN_INDEX

    device = torch.device("cuda" if gpu else "cpu")
    with tempfile.TemporaryDirectory() as d:
        model = build_model(gpu, Path(d)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5)
    g = torch.Generator().manual_seed(n)
    feats = torch.randn(n, 512, generator=g).to(device)
    ids = torch.randint(10, 250, (1, TEXT_TOKENS), generator=g)
    ids[0, 8] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[0, : TEXT_TOKENS - 32] = -100
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = model(features=[feats], **batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernels
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if gpu:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"patches": n, "seconds_per_step": dt, "tokens_per_s": (n + TEXT_TOKENS - 1) / dt, "patches_per_s": n / dt,
            "peak_mem_gib": peak, "device": "cuda bf16 autocast, fp32 weights, 0.5B Qwen2 + grad ckpt" if gpu else
            f"cpu fp32 tiny LLM, {torch.get_num_threads()} threads",
            "llm_params_m": sum(p.numel() for p in model.llm.parameters()) / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="0.5B Qwen2-shaped LLM on CUDA (bf16 autocast)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        print("--gpu asked but CUDA is not available", file=sys.stderr)
        return 2
    if args.worker is not None:
        print(json.dumps(one_size(args.worker, args.gpu, args.steps)))
        return 0
    results = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--worker", str(n), "--steps", str(args.steps)] + (["--gpu"] if args.gpu else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return out.returncode
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{n:6d} patches: {r['seconds_per_step']:7.2f} s/step  {r['tokens_per_s']:9.0f} tokens/s  "
              f"{r['patches_per_s']:9.0f} patches/s  peak {r['peak_mem_gib']:.2f} GiB  ({r['device']})", flush=True)
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            print(f"{r['patches']} vs {base['patches']} patches: time x{r['seconds_per_step'] / base['seconds_per_step']:.2f} "
                  f"for x{r['patches'] / base['patches']:.0f} patches")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
