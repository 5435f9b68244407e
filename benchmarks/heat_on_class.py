"""Does the heatmap of `slidechat serve` fall where the class is? Measured on the demo (run the demo DAG first).

The synthetic demo knows where its class lives (`preprocessing.synthetic` draws every slide from tissue blobs
of one appearance). Two measurements, both comparing the **share of the positive heat** on the class region
with the region's **share of the kept patches** (equal shares = a heatmap that knows nothing):

1. Held-out demo slides (one class each): the region is the tissue itself (per patch, the fraction of its
   pixels that are tissue in the slide's scene, re-rendered coarsely), the question the demo's diagnosis
   question, the answer the model's own.
2. Two-class slides written here from the demo's appearances (same tissue blobs, one class left of the
   middle, another right of it; every ordered pair of classes), preprocessed with the cached stages of
   `slidechat ask`: for each class, the heat of the answer naming it, on its half; and the heat of the
   model's own answer on the half of the class it names.

Attributions compared: integrated gradients from the slide's mean patch (what `slidechat serve` draws),
integrated gradients from zero features, one-step gradient x input, and attention from the answer tokens
to the visual tokens averaged over heads and layers (eager attention: small LLMs only, `--no-attention`
to skip).

    python benchmarks/heat_on_class.py [--results results] [--model results/models/stage2] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import openslide
import torch

from preprocessing.stores import load_features
from preprocessing.synthetic import APPEARANCES, BACKGROUND, CLASSES, Scene, write_synthetic_svs
from slidechat.demo_data import CLASS_TEXT, DIAGNOSIS_QUESTIONS, format_mc_prompt, multiple_choice
from slidechat.evaluate import load_model_on, model_device_dtype
from slidechat.inference import model_feature_config, prepare_slide
from slidechat.serve.app import feature_settings
from slidechat.serve.attribution import answer_log_prob, heat_share, patch_attribution
from slidechat.serve.slides import OutputFinder, SlideEntry
from slidechat.template import IMAGE_TOKEN_INDEX, build_generation_prompt


@dataclass
class SplitScene:
    """The tissue blobs of `left` drawn in `left`'s appearance left of x = `split` and `right`'s beyond it."""

    left: Scene
    right: Scene
    split: float

    @property
    def width(self) -> int:
        return self.left.width

    @property
    def height(self) -> int:
        return self.left.height

    def render(self, x0: float, y0: float, w: int, h: int, ds: float = 1.0) -> np.ndarray:
        xs = x0 + (np.arange(w) + 0.5) * ds
        return np.where((xs < self.split)[None, :, None], self.left.render(x0, y0, w, h, ds),
                        self.right.render(x0, y0, w, h, ds))


def tissue_fraction(scene: Scene, coords: np.ndarray, size: float, ds: float = 8.0) -> np.ndarray:
    """Per patch, the share of its pixels that differ from the glass (a coarse re-render of the scene)."""
    n = max(1, int(round(size / ds)))
    out = []
    for x, y in coords:
        rgb = scene.render(float(x), float(y), n, n, size / n).astype(np.float32)
        out.append(float((np.abs(rgb - BACKGROUND).max(axis=2) > 15).mean()))
    return np.asarray(out)


def demo_scene(path: Path, slide_id: str, class_name: str) -> Scene:
    """The scene a demo slide was drawn from (`make_demo_slides`: seed = demo seed * 1000 + index, seed 0),
    checked against the slide's pixels."""
    with openslide.OpenSlide(str(path)) as slide:
        w0, h0 = slide.dimensions
        level = slide.level_count - 1
        ds = slide.level_downsamples[level]
        seen = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"), np.float32)
    scene = Scene.random(w0, h0, class_name, seed=int(slide_id.rsplit("-", 1)[1]))
    drawn = scene.render(0, 0, seen.shape[1], seen.shape[0], ds).astype(np.float32)
    if np.abs(drawn - seen).mean() > 10:
        raise SystemExit(f"{path} does not match its scene: was the demo made with demo.seed 0?")
    return scene


def half_fraction(coords: np.ndarray, size: float, split: float, left: bool) -> np.ndarray:
    """Per patch, the share of its width on the left (or right) of x = split."""
    f = np.clip((split - coords[:, 0]) / size, 0.0, 1.0)
    return f if left else 1.0 - f


def diagnosis_question(rng: random.Random) -> str:
    """The demo's multiple-choice diagnosis question (options shuffled), without the `<image>` line."""
    options, _ = multiple_choice(CLASSES[0], "diagnosis", rng.choice("ABCD"), rng)
    return format_mc_prompt(rng.choice(DIAGNOSIS_QUESTIONS), options).removeprefix("<image>\n")


# ----------------------------------------------------------------------------------- other attributions


def integrated_gradients_zero(model, x: torch.Tensor, q: str, a: str, steps: int = 16) -> np.ndarray:
    total = torch.zeros_like(x)
    for t in (torch.arange(steps) + 0.5) / steps:
        point = (float(t) * x).requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(answer_log_prob(model, point, q, a), point)
        total += g
    return (total / steps * x).sum(1).cpu().numpy()


def gradient_x_input(model, x: torch.Tensor, q: str, a: str) -> np.ndarray:
    point = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(answer_log_prob(model, point, q, a), point)
    return (g * x).sum(1).cpu().numpy()


def answer_attention(model, x: torch.Tensor, q: str, a: str) -> np.ndarray:
    """Attention of the answer tokens to the visual tokens, averaged over answer tokens, heads and layers."""
    tok = model.tokenizer
    answer_ids = tok.encode(a, add_special_tokens=False)
    prompt = build_generation_prompt(tok, q, None, with_image=True)
    start = prompt.index(IMAGE_TOKEN_INDEX)
    ids = torch.tensor(prompt + answer_ids, device=model.device)
    model.llm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            visual = model.encode_slide(x)
            out = model(input_ids=ids[None], visual_embeds=[visual], output_attentions=True)
    finally:
        model.llm.set_attn_implementation("sdpa")
    n, total = visual.shape[0], out.attentions[0].shape[-1]
    rows = slice(total - len(answer_ids) - 1, total - 1)  # positions predicting the answer tokens
    att = torch.stack([layer[0, :, rows, start:start + n] for layer in out.attentions])
    return att.float().mean(dim=(0, 1, 2)).cpu().numpy()


def methods(steps: int, attention: bool) -> dict[str, Callable]:
    found: dict[str, Callable] = {
        "ig_slide_mean (served)": lambda m, x, q, a: patch_attribution(m, x, q, a, steps=steps),
        "ig_zero": lambda m, x, q, a: integrated_gradients_zero(m, x, q, a, steps),
        "gradient_x_input": gradient_x_input,
    }
    if attention:
        found["attention"] = answer_attention
    return found


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results", help="results folder of the demo run")
    p.add_argument("--model", default=None, help="model directory (default <results>/models/stage2)")
    p.add_argument("--llm", default=None)
    p.add_argument("--work-dir", default=None, help="two-class slides and their cache (default <results>/bench_heat)")
    p.add_argument("--size", type=int, default=6144, help="level-0 side of the two-class slides")
    p.add_argument("--steps", type=int, default=16, help="integration steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    a = p.parse_args()
    results = Path(a.results)
    model_dir = Path(a.model or results / "models" / "stage2")
    work = Path(a.work_dir or results / "bench_heat")
    model = load_model_on(model_dir, a.llm, a.device)
    device, dtype = model_device_dtype(model)
    finder = OutputFinder(results, work / "cache", model_feature_config(model_dir))
    rng = random.Random(0)
    found = methods(a.steps, not a.no_attention)
    report: dict[str, dict] = {}

    def run(x: torch.Tensor, question: str, answer: str, region: np.ndarray, key: str) -> None:
        for name, fn in found.items():
            t0 = time.perf_counter()
            heat = fn(model, x, question, answer)
            share, area = heat_share(heat, region)
            row = report.setdefault(key, {}).setdefault(name, {"heat": [], "area": [], "seconds": 0.0})
            row["heat"].append(share)
            row["area"].append(area)
            row["seconds"] += time.perf_counter() - t0

    # 1. held-out demo slides: tissue is the class region
    labels = results / "demo" / "slides" / "labels.csv"
    with open(labels, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    for r in rows:
        store = finder.find(SlideEntry(r["slide_id"], Path(r["path"]))).store
        if store is None:
            raise SystemExit(f"no features for {r['slide_id']} in {results}: run the demo DAG first")
        fs = load_features(store)
        x = torch.from_numpy(fs.features).to(device, dtype)
        scene = demo_scene(Path(r["path"]), r["slide_id"], r["class_name"])
        size = float(fs.attrs["patch_size_level0"])
        region = tissue_fraction(scene, fs.coords, size)
        question = diagnosis_question(rng)
        with torch.inference_mode():
            answer = model.generate(x, question, max_new_tokens=20)
        run(x, question, answer, region, "demo held-out slides: own answer, heat on tissue")

    # 2. two-class slides
    settings, reason = feature_settings(model_dir, None)
    if settings is None:
        raise SystemExit(reason)
    half = a.size / 2
    for n, (left_cls, right_cls) in enumerate(itertools.permutations(CLASSES, 2)):
        slide = work / f"two-class-{n}-{left_cls}-{right_cls}.svs"
        if not slide.exists():
            left = Scene.random(a.size, a.size, left_cls, seed=100 + n)
            right = Scene(a.size, a.size, APPEARANCES[right_cls], left.seed, left.blobs)
            slide.parent.mkdir(parents=True, exist_ok=True)
            write_synthetic_svs(slide, SplitScene(left, right, half), mpp=0.25)
        store = prepare_slide(slide, settings, work / "cache" / slide.stem, log=lambda s: None)
        fs = load_features(store)
        x = torch.from_numpy(fs.features).to(device, dtype)
        size = float(fs.attrs["patch_size_level0"])
        question = diagnosis_question(rng)
        for cls, is_left in ((left_cls, True), (right_cls, False)):
            region = half_fraction(fs.coords, size, half, is_left)
            run(x, question, f"{CLASS_TEXT[cls].diagnosis}.", region, "two-class slides: each class's answer, heat on its half")
        with torch.inference_mode():
            answer = model.generate(x, question, max_new_tokens=20)
        named = [c for c in (left_cls, right_cls) if CLASS_TEXT[c].diagnosis.lower() in answer.lower()]
        if named:
            region = half_fraction(fs.coords, size, half, named[0] == left_cls)
            run(x, question, answer, region, "two-class slides: own answer, heat on the named class's half")

    print(f"model {model_dir}, {a.steps} integration steps, device {a.device}\n")
    summary: dict[str, dict] = {}
    for key, by_method in report.items():
        print(key)
        print(f"  {'attribution':<24} {'heat share':>10} {'area share':>10} {'heat > area':>12} {'s/answer':>9}")
        for name, row in by_method.items():
            heat, area = np.mean(row["heat"]), np.mean(row["area"])
            wins = sum(h > r for h, r in zip(row["heat"], row["area"]))
            per = row["seconds"] / len(row["heat"])
            print(f"  {name:<24} {heat:>10.3f} {area:>10.3f} {wins:>8d}/{len(row['heat']):<3d} {per:>9.2f}")
            summary.setdefault(key, {})[name] = {"heat_share": heat, "area_share": area, "cases": len(row["heat"]),
                                                 "heat_above_area": wins, "seconds_per_answer": per}
        print()
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
