"""Exercise every CUDA path of the project once, with random models: PASS/FAIL lines plus throughput.

    python benchmarks/gpu_check.py              # on one GPU; about 5 minutes on an 80 GB card
    python benchmarks/gpu_check.py --cpu        # the same checks at small sizes on the CPU (the test suite runs it)
    python benchmarks/gpu_check.py --only longnet llm7b

Checks (GPU sizes; the CPU branch shrinks them):
  extraction   CONCH ViT-B/16 (random weights) through the extractor's model stage, bf16 autocast on the GPU,
               against the same weights in fp32 on the CPU: cosine of the features.
  longnet      dilated attention at 20,000 tokens, strided and gather paths, fp32 and bf16 on the device,
               against the CPU in fp32 (the kernel `cuda_attention_kernel` chose is printed).
  stage1       `slidechat train` stage 1 in one process (bf16 autocast, fp32 masters, gradient checkpointing);
  stage1_4bit  the same with the frozen LLM in bitsandbytes NF4 (SKIP without bitsandbytes or CUDA).
  stage2       stage 2 from that model, full fine-tuning; stage2_lora: with LoRA adapters.
  zero2        stage 2 under this interpreter's torchrun with DeepSpeed ZeRO-2 (one rank per visible GPU,
               at most 2).
  generate     SlideChat.generate with the KV cache on a slide of 38,400 visual tokens (the inference cap),
               greedy tokens equal to a loop of full forwards without the cache.
  llm7b        a random Qwen2.5-7B-shaped LLM (bf16, gradient checkpointing) forward + backward at 10,240
               visual tokens: loss on labelled positions only vs the full-vocabulary logits, peak memory.
Exit status 1 when any check FAILs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1_000_000.0,
                 tie_word_embeddings=False, rms_norm_eps=1e-6)
SLIDECHAT_SEGMENTS = ([1024, 2048, 4096, 8192, 16384], [1, 2, 4, 8, 16])


@dataclass
class Sizes:
    """What each check runs at: the GPU sizes are the real ones, the CPU ones fit a test suite."""

    patches: int  # extraction batch
    encoder: str
    longnet_tokens: int
    segments: tuple[list[int], list[int]]
    train_patches: int
    generate_tokens: int
    llm7b_tokens: int
    llm7b_shape: dict
    ranks: int


GPU = Sizes(patches=256, encoder="conch_v1", longnet_tokens=20000, segments=SLIDECHAT_SEGMENTS, train_patches=4096,
            generate_tokens=38400, llm7b_tokens=10240, llm7b_shape=QWEN25_7B, ranks=2)
CPU = Sizes(patches=8, encoder="conch_tiny", longnet_tokens=300, segments=([16, 32, 64, 128, 256], [1, 2, 4, 8, 16]),
            train_patches=64, generate_tokens=600, llm7b_tokens=512,
            llm7b_shape=dict(QWEN25_7B, hidden_size=56, intermediate_size=296, num_hidden_layers=2,
                             num_attention_heads=7, num_key_value_heads=1, vocab_size=1024), ranks=1)


class Skip(Exception):
    """A check that cannot run here (a missing optional package)."""


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    work: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def peak_gib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two [N, D] tensors, in fp64."""
    return torch.nn.functional.cosine_similarity(a.double().flatten(1), b.double().flatten(1), dim=1)


def _timed(ctx: Context, fn: Callable[[], object]) -> tuple[object, float]:
    ctx.sync()
    t0 = time.perf_counter()
    out = fn()
    ctx.sync()
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------- checks


def check_extraction(ctx: Context) -> str:
    from preprocessing.encoders import build_encoder
    from preprocessing.extract import ModelRunner

    n = ctx.sizes.patches
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8))
    reference = ModelRunner(build_encoder(ctx.sizes.encoder, allow_random=True, device="cpu"))
    runner = ModelRunner(build_encoder(ctx.sizes.encoder, allow_random=True, device=ctx.device))
    expected = torch.from_numpy(reference.launch(images)[0]())  # launch -> (wait for features, input-free event)
    runner.launch(images[:8])[0]()  # warm-up: kernels, allocations
    got, dt = _timed(ctx, lambda: torch.from_numpy(runner.launch(images)[0]()))
    cos = float(cosine(got, expected).min())
    assert cos > 0.99, f"features differ from CPU fp32: min cosine {cos:.5f}"
    return f"{runner.precision} vs CPU fp32, min cosine {cos:.5f}; {n / dt:.0f} patches/s ({ctx.sizes.encoder})"


def check_longnet(ctx: Context) -> str:
    from slidechat.longnet import (_strided_length, cuda_attention_kernel, dilated_attention_gather,
                                   dilated_attention_strided)

    length, (segs, ratios) = ctx.sizes.longnet_tokens, ctx.sizes.segments
    heads, head_dim = 8, 64
    assert _strided_length(length, segs, ratios) is not None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, length, heads, head_dim, generator=g) for _ in range(3))
    reference = {path: fn(q, k, v, segs, ratios) for path, fn in
                 (("strided", dilated_attention_strided), ("gather", dilated_attention_gather))}
    torch.testing.assert_close(reference["gather"], reference["strided"], atol=1e-5, rtol=1e-5)
    parts = []
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        qd, kd, vd = (t.to(ctx.device, dtype) for t in (q, k, v))
        for path, fn in (("strided", dilated_attention_strided), ("gather", dilated_attention_gather)):
            fn(qd, kd, vd, segs, ratios)  # warm-up
            out, dt = _timed(ctx, lambda: fn(qd, kd, vd, segs, ratios))
            err = float((out.float().cpu() - reference[path]).abs().max() / reference[path].abs().max())
            assert err < tol, f"{path} {dtype} differs from CPU fp32: relative error {err:.2e}"
            parts.append(f"{path}/{str(dtype)[6:]} err {err:.1e} {length / dt:,.0f} tok/s")
    kernel = cuda_attention_kernel(torch.cuda.get_device_capability(ctx.device), torch.bfloat16, head_dim) \
        if ctx.cuda else "cpu flash"
    return f"{length} tokens, bf16 kernel {kernel}: " + ", ".join(parts)


def _training_data(ctx: Context) -> dict[str, Path]:
    """A tiny LLM, eight slides' feature stores and records, made once per run."""
    from preprocessing.stores import write_zarr_store
    from slidechat.tiny import build_tiny_llm

    root = ctx.work / "train_data"
    if (root / "data.json").exists():
        return {"root": root, "llm": root / "llm", "features": root / "features", "data": root / "data.json"}
    answers = ["Glands with crowded nuclei.", "Sheets of small lymphocytes.", "Wavy pink collagen fibres."]
    build_tiny_llm(root / "llm", answers + ["Describe the tissue."] * 3, vocab_size=400, hidden_size=64,
                   num_layers=2, num_heads=4)
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        n = ctx.sizes.train_patches
        coords = np.stack([np.arange(n) % 64, np.arange(n) // 64], 1).astype(np.int64) * 224
        write_zarr_store(root / "features" / f"s{i}.zarr", rng.normal(0, 1, (n, 512)).astype(np.float32), coords,
                         None, {"encoder": "random"})
        records.append({"id": f"r{i}", "image": [f"s{i}.zarr"], "slide_id": f"s{i}",
                        "conversations": [{"from": "human", "value": "<image>\nDescribe the tissue."},
                                          {"from": "gpt", "value": answers[i % 3]}]})
    (root / "data.json").write_text(json.dumps(records))
    return {"root": root, "llm": root / "llm", "features": root / "features", "data": root / "data.json"}


def _train_args(ctx: Context, name: str, stage: int, *flags: str) -> list[str]:
    d = _training_data(ctx)
    args = {"stage": stage, "data": d["data"], "features-dir": d["features"], "llm": d["llm"],
            "out": ctx.work / name / "model", "work-dir": ctx.work / name / "work", "max-steps": 3, "grad-accum": 2,
            "lr": 1e-3, "warmup-ratio": 0.0, "max-patches": ctx.sizes.train_patches, "threads": 1,
            "model-config": json.dumps({"encoder_layers": 2})}
    if stage == 2:
        args["init"] = ctx.work / "stage1" / "model"
    return [a for k, v in args.items() for a in (f"--{k}", str(v))] + list(flags)


def _summary(model_dir: Path) -> str:
    rows = [r.split(",") for r in (model_dir / "train_log.csv").read_text().splitlines()[1:]]
    assert rows and all(math.isfinite(float(r[1])) for r in rows), f"non-finite loss in {model_dir}"
    return f"{len(rows)} steps, loss {float(rows[0][1]):.3f} -> {float(rows[-1][1]):.3f}, " \
           f"{float(rows[-1][3]):,.0f} tokens/s"


def _train(ctx: Context, name: str, stage: int, *flags: str) -> str:
    """`slidechat train` in this process; the saved slide encoder and projector must be fp32."""
    from slidechat import train as T
    from slidechat.checkpoint import load_model

    cfg, _ = T.config_from_args(_train_args(ctx, name, stage, *flags))
    ctx.reset_peak()
    out = T.train(cfg)
    model = load_model(out, llm=cfg.llm)
    dtypes = {str(p.dtype)[6:] for n, p in model.named_parameters() if n.startswith(("LongNet_encoder", "projector"))}
    assert dtypes == {"float32"}, f"saved slide encoder / projector in {dtypes}, not fp32"
    return f"{_summary(out)}, peak {ctx.peak_gib():.2f} GiB"


def check_stage1(ctx: Context) -> str:
    return _train(ctx, "stage1", 1)


def check_stage1_4bit(ctx: Context) -> str:
    if not ctx.cuda:
        raise Skip("needs CUDA")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Skip("bitsandbytes not installed (pip install -c constraints.txt '.[quant]')") from None
    return _train(ctx, "stage1_4bit", 1, "--load-in-4bit")


def check_stage2(ctx: Context) -> str:
    if not (ctx.work / "stage1" / "model").exists():
        raise Skip("needs the stage1 check's model")
    return _train(ctx, "stage2", 2)


def check_stage2_lora(ctx: Context) -> str:
    if not (ctx.work / "stage1" / "model").exists():
        raise Skip("needs the stage1 check's model")
    return _train(ctx, "stage2_lora", 2, "--lora", "--lora-r", "8")


def check_zero2(ctx: Context) -> str:
    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed not installed")
    if not (ctx.work / "stage1" / "model").exists():
        raise Skip("needs the stage1 check's model")
    ranks = min(ctx.sizes.ranks, torch.cuda.device_count()) if ctx.cuda else ctx.sizes.ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone", "-m",
           "slidechat.cli", "train", *_train_args(ctx, "zero2", 2),
           "--deepspeed", str(REPO / "configs" / "deepspeed" / "zero2.json")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if not ctx.cuda:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return f"{ranks} rank(s): {_summary(ctx.work / 'zero2' / 'model')}, {time.perf_counter() - t0:.0f} s with start-up"


def _random_slidechat(ctx: Context, hidden: int, layers: int, dtype: torch.dtype, max_infer: int):
    """SlideChat with a random Qwen2 LLM of the given size (the tiny LLM's tokenizer)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from slidechat.model import SlideChat, SlideChatConfig

    tok = AutoTokenizer.from_pretrained(_training_data(ctx)["llm"])
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3,
                                       num_hidden_layers=layers, num_attention_heads=hidden // 64 or 1,
                                       num_key_value_heads=1, max_position_embeddings=65536,
                                       rope_theta=1_000_000.0, pad_token_id=tok.pad_token_id))
    model = SlideChat(llm, tok, SlideChatConfig(max_patches_infer=max_infer))
    return model.to(ctx.device, dtype).eval()


def check_generate(ctx: Context) -> str:
    from slidechat.evaluate import EvalSettings, questions_per_call
    from slidechat.template import build_generation_prompt

    n = ctx.sizes.generate_tokens
    # fp32: the cached and the uncached greedy paths must agree token for token
    model = _random_slidechat(ctx, hidden=512 if ctx.cuda else 64, layers=4 if ctx.cuda else 2,
                              dtype=torch.float32, max_infer=n)
    feats = torch.randn(n, 512, generator=torch.Generator().manual_seed(1))
    per_call = questions_per_call(EvalSettings(), n)  # what `slidechat evaluate` batches at this length
    ctx.reset_peak()
    with torch.inference_mode():
        visual, t_enc = _timed(ctx, lambda: model.encode_slide(feats))
        new = 8
        answer, t_gen = _timed(ctx, lambda: model.generate(None, "Describe the tissue.", visual_embeds=visual,
                                                           max_new_tokens=new, min_new_tokens=new))
        ids = build_generation_prompt(model.tokenizer, "Describe the tissue.")
        emb, _ = model._splice(torch.tensor(ids, device=ctx.device), None, visual)
        cached = model.llm.generate(inputs_embeds=emb[None], attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long,
                                    device=ctx.device), max_new_tokens=4, min_new_tokens=4, do_sample=False)[0].tolist()
        loop: list[int] = []
        for _ in range(4):
            extra = model.llm.get_input_embeddings()(torch.tensor(loop, dtype=torch.long, device=ctx.device))
            logits = model.llm(inputs_embeds=torch.cat([emb, extra])[None], logits_to_keep=1).logits
            loop.append(int(logits[0, -1].argmax()))
    assert cached[:4] == loop, f"KV-cached greedy tokens {cached[:4]} differ from full forwards {loop}"
    assert isinstance(answer, str)
    return f"{visual.shape[0]} visual tokens: encode {t_enc:.2f} s, {new / t_gen:.1f} new tokens/s with the cache, " \
           f"peak {ctx.peak_gib():.2f} GiB; evaluation asks {per_call} question(s) per call at this length"


def check_llm7b(ctx: Context) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from slidechat.model import SlideChat, SlideChatConfig
    from slidechat.template import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    n_vis, text = ctx.sizes.llm7b_tokens, 128
    shape = ctx.sizes.llm7b_shape
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    tok = AutoTokenizer.from_pretrained(_training_data(ctx)["llm"])
    ctx.reset_peak()
    with torch.device(ctx.device):  # random weights made on the device, not copied there
        llm = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=dtype)
    # stage 2 as trained: slide encoder and projector fp32, bf16 LLM, activation checkpointing, autocast
    model = SlideChat(llm, tok, SlideChatConfig(max_patches_train=n_vis)).to(ctx.device)
    model.gradient_checkpointing_enable()
    model.train()
    n_params = sum(p.numel() for p in llm.parameters()) / 1e9
    weights_gib = torch.cuda.memory_allocated() / 2**30 if ctx.cuda else 0.0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, shape["vocab_size"] - 10, (1, text), generator=g)
    ids[0, 8] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[0, : text - 48] = IGNORE_INDEX
    feats = torch.randn(n_vis, 512, generator=g)
    batch = {"input_ids": ids.to(ctx.device), "attention_mask": torch.ones_like(ids).to(ctx.device),
             "labels": labels.to(ctx.device)}
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda)

    def step(full_logits: bool) -> float:
        with autocast:
            if full_logits:  # the LLM's own loss over every position's logits (what the model did before)
                emb, lab = model._splice(batch["input_ids"][0], batch["labels"][0], model.encode_slide(feats))
                loss = model.llm(inputs_embeds=emb[None], labels=lab[None]).loss
            else:
                loss = model(features=[feats], **batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    results = {}
    for full in (False, True):
        ctx.reset_peak()
        loss, dt = _timed(ctx, lambda: step(full))
        results[full] = (loss, dt, ctx.peak_gib())
    (loss, dt, peak), (loss_full, _, peak_full) = results[False], results[True]
    assert abs(loss - loss_full) < 2e-2 * max(1.0, abs(loss_full)), f"labelled-only loss {loss} vs full {loss_full}"
    tokens = n_vis + text - 1
    return f"{n_params:.2f}B params ({weights_gib:.1f} GiB weights), {tokens} tokens: fwd+bwd {dt:.2f} s " \
           f"({tokens / dt:,.0f} tokens/s), peak {peak:.1f} GiB with labelled-only logits vs {peak_full:.1f} GiB " \
           f"with full logits"


CHECKS: dict[str, Callable[[Context], str]] = {
    "extraction": check_extraction, "longnet": check_longnet, "stage1": check_stage1, "stage1_4bit": check_stage1_4bit,
    "stage2": check_stage2, "stage2_lora": check_stage2_lora, "zero2": check_zero2, "generate": check_generate,
    "llm7b": check_llm7b,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run the checks at small sizes on the CPU")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), help="run these checks only")
    p.add_argument("--work-dir", help="keep the check's files here (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the small CPU checks", file=sys.stderr)
        return 2
    device = torch.device("cpu") if a.cpu else torch.device("cuda", 0)
    name = "cpu" if a.cpu else torch.cuda.get_device_name(device)
    print(f"gpu_check on {name}, torch {torch.__version__}", flush=True)
    results, failed = [], 0
    with (contextlib.nullcontext(a.work_dir) if a.work_dir else tempfile.TemporaryDirectory()) as work:
        ctx = Context(device, CPU if a.cpu else GPU, Path(work))
        for check, fn in CHECKS.items():
            if a.only and check not in a.only:
                continue
            t0 = time.perf_counter()
            try:
                status, detail = "PASS", fn(ctx)
            except Skip as e:
                status, detail = "SKIP", str(e)
            except Exception as e:  # a failed check is reported and the others still run
                status, detail = "FAIL", f"{type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
                failed += 1
            seconds = time.perf_counter() - t0
            print(f"{status} {check}: {detail} [{seconds:.1f} s]", flush=True)
            results.append({"check": check, "status": status, "detail": detail, "seconds": round(seconds, 2)})
            if ctx.cuda:
                torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "results": results}, indent=2) + "\n")
    print(f"{len(results) - failed} of {len(results)} checks passed or skipped, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
