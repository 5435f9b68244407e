"""Where an answer came from: one number per patch, how much it moved the answer's probability.

The attribution is **integrated gradients on the patch features, from the slide's average patch**. For the
answer `a` the model gave to question `q` about a slide with patch features `x` (N, 512) and the baseline
`b` = every patch replaced by the slide's mean feature vector,

    heat_i = sum_d (x_id - b_d) * mean_{t in steps} d log p(a | b + t (x - b), q) / d x_id

(midpoint rule over `steps` points of the straight path from `b` to `x`). The heats add up to
`log p(a | x) - log p(a | b)` (completeness, up to the quadrature error): how much more likely the slide
made the answer than a slide whose patches all look alike, shared out over the patches. Positive heat is
evidence for the answer, negative heat evidence against it; the viewer draws the positive part.

Why this one:

* It is computed through the LLM, the projector *and* the LongNet slide encoder, so it scores the patches
  themselves: with `context: slide` a visual token mixes information from other patches, and a patch that
  the inference patch cap drops gets exactly zero.
* Attention from the answer tokens to the visual tokens (averaged over heads and layers) says where the
  model looked, not what changed its answer (it ignores the value vectors, the MLPs and everything before
  the LLM), and needs the eager attention path whose memory grows with the square of the sequence. On the
  demo model it is flat: its share of heat on a class region equals the region's share of patches.
* Plain gradient x input (one step, zero baseline) is cheaper but local: on the demo's two-class slides it
  put the heat for "lymphoid" on the *other* class. Zero is also no neutral baseline here (the slide encoder
  layer-normalises every patch, so a zero vector is as unusual an input as any). The slide's mean patch
  keeps the slide's overall appearance and removes only what distinguishes one patch from the others.
  `benchmarks/heat_on_class.py` measures all of these on the demo; `docs/serve.md` has the numbers.

Cost: `steps` forward and backward passes of the model over the slide (no parameter gradients).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from slidechat.template import build_generation_prompt


@contextmanager
def _frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients (and none of the activations kept only for them) while attributing."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def answer_log_prob(model, features: Tensor, question: str, answer: str,
                    history: Sequence[tuple[str, str]] | None = None) -> Tensor:
    """log p(answer | slide features, question, history) under teacher forcing (a scalar tensor).

    The prompt is the one `SlideChat.generate` builds (the first user turn carries the slide); the answer is
    tokenised as the model's own reply text. Gradients flow to `features` when it requires them.
    """
    tokenizer = model.tokenizer
    answer_ids = list(tokenizer.encode(answer, add_special_tokens=False))
    if not answer_ids:
        raise ValueError("an empty answer has no probability to attribute")
    prompt = build_generation_prompt(tokenizer, question, history, with_image=True)
    device = model.llm.get_input_embeddings().weight.device
    ids = torch.tensor(prompt + answer_ids, device=device)
    visual = model.encode_slide(features)
    # only the rows that predict answer tokens need logits (the vocabulary times 38k positions would not fit)
    out = model(input_ids=ids[None], visual_embeds=[visual], logits_to_keep=len(answer_ids) + 1)
    logits = out.logits[0, :-1].float()
    target = torch.tensor(answer_ids, device=logits.device)
    return torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum()


def patch_attribution(model, features: Tensor, question: str, answer: str,
                      history: Sequence[tuple[str, str]] | None = None, steps: int = 16) -> np.ndarray:
    """Integrated gradients of log p(answer) from the slide's mean patch: float32 (N,), one signed value per
    row of `features` (see the module docstring)."""
    if model.training:
        raise RuntimeError("attribution needs the model in eval mode (no dropout)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = features.detach().to(torch.float32)
    baseline = x.mean(dim=0, keepdim=True)
    delta = x - baseline
    total = torch.zeros_like(x)
    with torch.enable_grad(), _frozen_parameters(model):
        for t in (torch.arange(steps, dtype=torch.float32) + 0.5) / steps:
            point = (baseline + float(t) * delta).requires_grad_(True)
            log_p = answer_log_prob(model, point, question, answer, history)
            (grad,) = torch.autograd.grad(log_p, point)
            total += grad
    return (total / steps * delta).sum(dim=1).cpu().numpy().astype(np.float32)


def display_heat(heat: np.ndarray) -> np.ndarray:
    """The positive part scaled to [0, 1] (the viewer's colour scale); all zeros when nothing supports the answer."""
    pos = np.clip(np.asarray(heat, np.float64), 0.0, None)
    top = pos.max() if pos.size else 0.0
    return (pos / top if top > 0 else pos).astype(np.float32)


def heat_share(heat: np.ndarray, in_region: np.ndarray) -> tuple[float, float]:
    """(share of the positive heat on patches in the region, share of patches in the region).

    `in_region` is each patch's fraction inside the region (0..1) or a boolean mask. A heat share above
    the area share means the attribution prefers the region over the rest.
    """
    pos = np.clip(np.asarray(heat, np.float64), 0.0, None)
    w = np.asarray(in_region, np.float64)
    if pos.shape != w.shape:
        raise ValueError(f"heat {pos.shape} and region {w.shape} must have one value per patch")
    total = pos.sum()
    area = float(w.mean()) if w.size else 0.0
    return (float((pos * w).sum() / total) if total > 0 else 0.0), area

