"""The per-patch heatmap of `slidechat serve`: integrated gradients from the slide's mean patch.

Properties that hold for any model (completeness, zero heat for patches the cap drops, the model left as it
was), and the one that matters to a pathologist: on slides where the class lives in known patches, a model
trained here to name the class puts the heat of its answer on that class's patches.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from slidechat.checkpoint import new_model
from slidechat.model import SlideChatConfig
from slidechat.serve.attribution import answer_log_prob, display_heat, heat_share, patch_attribution
from slidechat.template import tokenize_conversation

CLASSES = {"adenocarcinoma": "Adenocarcinoma.", "lymphoid": "Lymphoid tissue.", "stroma": "Fibrous stroma."}
QUESTION = "Which tissue type is shown in this whole slide image?"


def tiny_model(llm, **config):
    torch.manual_seed(0)
    cfg = SlideChatConfig(encoder_layers=1, encoder_ffn_dim=64, encoder_heads=4, segment_lengths=[64, 128],
                          dilated_ratios=[1, 2], dropout=0.0, drop_path_rate=0.0, **config)
    return new_model(llm, cfg).eval()


@pytest.fixture(scope="module")
def random_model(tiny_llm):
    return tiny_model(tiny_llm)


def test_heat_adds_up_to_the_change_from_the_baseline(random_model):
    """Completeness: sum of heats = log p(answer | slide) - log p(answer | every patch = the mean patch)."""
    x = torch.randn(24, 512, generator=torch.Generator().manual_seed(1))
    answer = "Lymphoid tissue."
    heat = patch_attribution(random_model, x, QUESTION, answer, steps=64)
    with torch.no_grad():
        gap = (answer_log_prob(random_model, x, QUESTION, answer)
               - answer_log_prob(random_model, x.mean(0, keepdim=True).expand_as(x), QUESTION, answer)).item()
    assert heat.shape == (24,) and heat.dtype == np.float32
    assert abs(gap) > 1e-3
    assert heat.sum() == pytest.approx(gap, rel=0.05, abs=1e-3)


def test_patches_dropped_by_the_cap_get_no_heat_and_the_model_is_left_as_it_was(tiny_llm):
    model = tiny_model(tiny_llm, max_patches_infer=8)
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(20, 512, generator=torch.Generator().manual_seed(2))
    heat = patch_attribution(model, x, QUESTION, "Fibrous stroma.", steps=2)
    kept = np.linspace(0, 19, 8, dtype=int)  # slidechat.model.patch_cap_indices
    dropped = np.setdiff1d(np.arange(20), kept)
    assert np.all(heat[dropped] == 0) and np.any(heat[kept] != 0)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        patch_attribution(model, x, QUESTION, "Fibrous stroma.")


def test_display_and_share_helpers():
    heat = np.array([-2.0, 0.0, 1.0, 3.0])
    assert display_heat(heat).tolist() == pytest.approx([0.0, 0.0, 1 / 3, 1.0])
    assert display_heat(-heat[2:]).tolist() == [0.0, 0.0]  # nothing supports the answer
    share, area = heat_share(heat, np.array([True, True, False, True]))
    assert share == pytest.approx(0.75) and area == pytest.approx(0.75)
    with pytest.raises(ValueError):
        heat_share(heat, np.ones(3))


def class_slide(prototypes: torch.Tensor, labels: list[int], gen: torch.Generator) -> torch.Tensor:
    """Patch features: each patch is its class's prototype plus noise (the tiling order is the list order)."""
    return prototypes[labels] + 0.6 * torch.randn(len(labels), prototypes.shape[1], generator=gen)


@pytest.fixture(scope="module")
def trained(tiny_llm):
    """A tiny SlideChat trained to name the class of one-class slides of prototype features."""
    model = tiny_model(tiny_llm)
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(3, 512, generator=gen) + 0.5 * torch.randn(1, 512, generator=gen)  # shared part too
    answers = list(CLASSES.values())
    samples = []
    for c in range(3):
        for _ in range(8):
            n = int(torch.randint(12, 30, (1,), generator=gen))
            tok = tokenize_conversation(model.tokenizer, [{"from": "human", "value": "<image>\n" + QUESTION},
                                                          {"from": "gpt", "value": answers[c]}])
            samples.append((class_slide(prototypes, [c] * n, gen), torch.tensor(tok["input_ids"]),
                            torch.tensor(tok["labels"])))
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    order = torch.Generator().manual_seed(1)
    for _epoch in range(12):
        for k in torch.randperm(len(samples), generator=order).tolist():
            feats, ids, labels = samples[k]
            loss = model(features=[feats], input_ids=ids[None], labels=labels[None]).loss
            optim.zero_grad()
            loss.backward()
            optim.step()
    model.eval()
    return model, prototypes


def test_heat_falls_on_the_patches_of_the_class_the_answer_names(trained):
    model, prototypes = trained
    answers = list(CLASSES.values())
    gen = torch.Generator().manual_seed(5)
    for c in range(3):  # it learned: one-class slides are named right
        with torch.no_grad():
            assert model.generate(class_slide(prototypes, [c] * 20, gen), QUESTION, max_new_tokens=8) == answers[c]
    shares, areas = [], []
    for a, b in itertools.permutations(range(3), 2):
        # a 6 x 6 grid in row-major order: class a in the left 2 (or 4) columns, class b in the rest
        split = 2 if a < b else 4
        left = np.array([col < split for _row in range(6) for col in range(6)])
        x = class_slide(prototypes, [a if is_left else b for is_left in left], gen)
        for cls, region in ((a, left), (b, ~left)):
            share, area = heat_share(patch_attribution(model, x, QUESTION, answers[cls], steps=8), region)
            shares.append(share)
            areas.append(area)
    wins = sum(s > r for s, r in zip(shares, areas))
    # chance is 6 of 12 (P(>= 10) = 2%); over six initial seeds of this model: 10-12 wins, mean share 0.84-1.00
    assert wins >= 10, (shares, areas)
    assert np.mean(shares) > np.mean(areas) + 0.25, (np.mean(shares), np.mean(areas))
