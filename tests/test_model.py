"""SlideChat model end to end on a tiny random Qwen2 LLM (tokenizer trained on the fly, no download)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from slidechat.checkpoint import load_model, new_model, save_model
from slidechat.model import (
    IMAGE_TOKEN_INDEX,
    SlideChat,
    SlideChatConfig,
    merge_visual_tokens,
    patch_cap_indices,
)
from slidechat.template import IGNORE_INDEX, build_generation_prompt, tokenize_conversation
from slidechat.tiny import build_tiny_llm

FEAT = 32


def tiny_config(**kw) -> SlideChatConfig:
    base = dict(feature_dim=FEAT, encoder_ffn_dim=64, encoder_heads=4, segment_lengths=[4, 8, 16],
                dilated_ratios=[1, 2, 4])
    base.update(kw)
    return SlideChatConfig(**base)


@pytest.fixture(scope="module")
def model(tiny_llm) -> SlideChat:
    torch.manual_seed(0)
    return new_model(tiny_llm, tiny_config())


def feats(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEAT, generator=g)


# -- tiny LLM ---------------------------------------------------------------------------------


def test_tiny_llm_is_deterministic_and_loads_offline(tiny_llm, tiny_llm_spec, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus, settings = tiny_llm_spec
    again = build_tiny_llm(tmp_path / "again", corpus, **settings)
    for f in sorted(p.name for p in tiny_llm.iterdir()):
        assert hashlib.sha256((tiny_llm / f).read_bytes()).digest() == hashlib.sha256((again / f).read_bytes()).digest(), f
    tok = AutoTokenizer.from_pretrained(tiny_llm, local_files_only=True)
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm, local_files_only=True)
    assert type(llm).__name__ == "Qwen2ForCausalLM"
    assert llm.config.vocab_size == len(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # no default system prompt
    sample = "The slide shows adenocarcinoma."
    assert tok.decode(tok.encode(sample, add_special_tokens=False)) == sample
    assert len(tok.encode("<|im_end|>", add_special_tokens=False)) == 1


def test_make_tiny_llm_cli(tmp_path, tiny_llm_spec):
    from slidechat.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny_llm_spec[0]))
    assert main(["make-tiny-llm", "--out", str(tmp_path / "m"), "--corpus", str(corpus)]) == 0
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()


# -- template ---------------------------------------------------------------------------------


def test_tokenize_conversation_masks_everything_but_replies(model):
    tok = model.tokenizer
    conv = [
        {"from": "human", "value": "What is the diagnosis of this slide?\n<image>"},
        {"from": "gpt", "value": "Adenocarcinoma."},
        {"from": "human", "value": "Describe the tissue in detail."},
        {"from": "gpt", "value": "Irregular glands."},
    ]
    out = tokenize_conversation(tok, conv)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels) and ids.count(IMAGE_TOKEN_INDEX) == 1
    text = tok.decode([i for i in ids if i != IMAGE_TOKEN_INDEX])
    assert text == (
        "<|im_start|>user\n\nWhat is the diagnosis of this slide?<|im_end|>\n<|im_start|>assistant\n"
        "Adenocarcinoma.<|im_end|>\n"
        "<|im_start|>user\nDescribe the tissue in detail.<|im_end|>\n<|im_start|>assistant\n"
        "Irregular glands.<|im_end|>\n"
    )
    # the image placeholder sits right after "<|im_start|>user\n"
    assert tok.decode(ids[: ids.index(IMAGE_TOKEN_INDEX)]) == "<|im_start|>user\n"
    supervised = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert supervised == "Adenocarcinoma.<|im_end|>Irregular glands.<|im_end|>"
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    short = tokenize_conversation(tok, conv, max_length=20)
    assert short["input_ids"] == ids[:20]
    with pytest.raises(ValueError, match="image"):
        tokenize_conversation(tok, [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}])


def test_generation_prompt_matches_training_format(model):
    tok = model.tokenizer
    ids = build_generation_prompt(tok, "What is the diagnosis?", history=[("Describe it.", "Glands.")])
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert tok.decode([i for i in ids if i != IMAGE_TOKEN_INDEX]) == (
        "<|im_start|>user\n\nDescribe it.<|im_end|>\n<|im_start|>assistant\nGlands.<|im_end|>\n"
        "<|im_start|>user\nWhat is the diagnosis?<|im_end|>\n<|im_start|>assistant\n"
    )
    # the prompt is a prefix of the training ids of the same conversation
    conv = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "Glands."},
            {"from": "human", "value": "What is the diagnosis?"}, {"from": "gpt", "value": "Tumour."}]
    train_ids = tokenize_conversation(tok, conv)["input_ids"]
    assert train_ids[: len(ids)] == ids


# -- slide encoding ---------------------------------------------------------------------------


def test_encode_slide_shapes_and_hidden_size(model):
    out = model.encode_slide(feats(40))
    assert out.shape == (40, model.llm.config.hidden_size)
    with pytest.raises(ValueError):
        model.encode_slide(torch.randn(5, FEAT + 1))


@pytest.mark.parametrize("context", ["per_patch", "slide"])
def test_context_controls_information_flow(tiny_llm, context):
    torch.manual_seed(1)
    m = new_model(tiny_llm, tiny_config(context=context))
    x = feats(37)
    y = x.clone()
    y[5] = feats(1, 99)[0]  # a different patch (a constant shift would vanish in the LayerNorms)
    a, b = m.encode_slide(x), m.encode_slide(y)
    others = torch.ones(37, dtype=torch.bool)
    others[5] = False
    assert not torch.allclose(a[5], b[5])
    if context == "per_patch":
        torch.testing.assert_close(a[others], b[others], atol=0, rtol=0)
    else:
        assert (a[others] - b[others]).abs().amax(dim=1).gt(1e-4).sum() > 5


def test_patch_cap_keeps_linspace_rows(tiny_llm):
    torch.manual_seed(2)
    m = new_model(tiny_llm, tiny_config(max_patches_infer=10, max_patches_train=7, dropout=0.0, drop_path_rate=0.0))
    x = feats(33)
    keep = patch_cap_indices(33, 10)
    np.testing.assert_array_equal(keep, np.linspace(0, 32, 10).astype(int))
    capped = m.encode_slide(x)
    assert capped.shape[0] == 10
    m.config.max_patches_infer = 1000
    torch.testing.assert_close(capped, m.encode_slide(x[torch.from_numpy(keep)]))
    m.train()
    assert m.encode_slide(x).shape[0] == 7
    m.eval()
    assert patch_cap_indices(10, 10) is None


def test_bypass_slide_encoder_feeds_projector_directly(tiny_llm):
    m = new_model(tiny_llm, tiny_config(bypass_slide_encoder=True))
    x = feats(12)
    torch.testing.assert_close(m.encode_slide(x), m.projector(x))


def test_visual_token_budget_merges_grid_neighbours(tiny_llm):
    tokens = torch.arange(16, dtype=torch.float32)[:, None].repeat(1, 3)
    ys, xs = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    coords = np.stack([xs.ravel() * 224, ys.ravel() * 224], axis=1)  # row-major 4 x 4 grid
    merged = merge_visual_tokens(tokens, coords, budget=4)
    # 2 x 2 cells of the 4 x 4 grid, row-major: mean of indices {0,1,4,5}, {2,3,6,7}, ...
    torch.testing.assert_close(merged[:, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))
    assert merge_visual_tokens(tokens, None, budget=5).shape[0] <= 5
    m = new_model(tiny_llm, tiny_config(visual_token_budget=4))
    assert m.encode_slide(feats(16), coords=coords).shape[0] == 4


# -- training forward -------------------------------------------------------------------------


def _batch(model):
    tok = model.tokenizer
    convs = [
        [{"from": "human", "value": "<image>\nWhat is the diagnosis of this slide?"}, {"from": "gpt", "value": "Adenocarcinoma."}],
        [{"from": "human", "value": "<image>\nDescribe the tissue in detail."}, {"from": "gpt", "value": "Fibrous stroma with scattered spindle cells."}],
    ]
    toks = [tokenize_conversation(tok, c) for c in convs]
    t = max(len(x["input_ids"]) for x in toks)
    ids = torch.full((2, t), tok.pad_token_id)
    labels = torch.full((2, t), IGNORE_INDEX)
    mask = torch.zeros(2, t, dtype=torch.long)
    for i, x in enumerate(toks):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        labels[i, :n] = torch.tensor(x["labels"])
        mask[i, :n] = 1
    return ids, mask, labels


def test_forward_splices_visual_tokens_per_sample(model):
    ids, mask, labels = _batch(model)
    f = [feats(11, 1), feats(23, 2)]
    out = model(features=f, input_ids=ids, attention_mask=mask)
    n_text = mask.sum(1) - 1
    assert out.logits.shape[1] == int(max(n_text[0] + 11, n_text[1] + 23))
    # each row equals the same sample run alone (padding and splicing do not leak)
    for i in range(2):
        n = int(mask[i].sum())
        alone = model(features=[f[i]], input_ids=ids[i:i + 1, :n])
        length = alone.logits.shape[1]
        torch.testing.assert_close(out.logits[i, :length], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_loss_is_next_token_cross_entropy_on_labelled_positions_only(model):
    ids, mask, labels = _batch(model)
    f = [feats(11, 1), feats(23, 2)]
    full = model(features=f, input_ids=ids, attention_mask=mask).logits  # [2, T', V]
    out = model(features=f, input_ids=ids, attention_mask=mask, labels=labels)
    # the replies' labels move behind each sample's visual tokens; a position predicts the next label
    expanded = torch.full(full.shape[:2], IGNORE_INDEX)
    for i, n_vis in enumerate((11, 23)):
        n = int(mask[i].sum())
        img = int((ids[i] == IMAGE_TOKEN_INDEX).nonzero()[0])
        row = torch.cat([labels[i, :img], torch.full((n_vis,), IGNORE_INDEX), labels[i, img + 1:n]])
        expanded[i, :len(row)] = row
    target = expanded[:, 1:]
    labelled = target != IGNORE_INDEX
    # logits exist only where a label is predicted (not for the visual tokens), and equal the full ones there
    assert out.logits.shape == (int(labelled.sum()), full.shape[-1]) and labelled.sum() < labelled.numel() / 3
    torch.testing.assert_close(out.logits, full[:, :-1][labelled], atol=1e-5, rtol=1e-5)
    manual = torch.nn.functional.cross_entropy(full[:, :-1][labelled], target[labelled])
    torch.testing.assert_close(out.loss, manual, atol=1e-5, rtol=1e-5)
    # the LLM's own loss over full logits agrees
    reference = torch.nn.functional.cross_entropy(full[:, :-1].flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, reference, atol=1e-5, rtol=1e-5)


def test_a_sample_whose_replies_were_cut_adds_nothing_to_the_loss(model):
    """max_length can cut every reply of a long record: no labelled token, so no loss, not an empty mean's NaN
    (which training reports as a diverged run)."""
    ids, mask, labels = _batch(model)
    f = [feats(11, 1), feats(23, 2)]
    cut = labels.clone()
    cut[1] = IGNORE_INDEX
    both = model(features=f, input_ids=ids, attention_mask=mask, labels=cut).loss
    first = model(features=f[:1], input_ids=ids[:1], attention_mask=mask[:1], labels=labels[:1]).loss
    torch.testing.assert_close(both, first, atol=1e-5, rtol=1e-5)  # the mean over the labelled tokens there are
    x = feats(11, 1).requires_grad_(True)
    none = model(features=[x], input_ids=ids[1:], attention_mask=mask[1:], labels=cut[1:]).loss
    assert none.item() == 0.0
    none.backward()  # still part of the graph: every rank runs its backward (DeepSpeed needs one per micro-batch)
    assert x.grad is not None and not x.grad.any()


def test_backward_reaches_slide_encoder_and_projector(tiny_llm):
    torch.manual_seed(3)
    m = new_model(tiny_llm, tiny_config()).train()
    m.llm.requires_grad_(False)
    m.gradient_checkpointing_enable()
    ids, mask, labels = _batch(m)
    out = m(features=[feats(11, 1), feats(23, 2)], input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert m.projector.model[0].weight.grad.abs().sum() > 0
    assert m.LongNet_encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.llm.parameters())


# -- generation -------------------------------------------------------------------------------


def _generate_ids(model, visual, questions):
    """Token ids of greedy answers (decoded strings of a random model can collapse whitespace)."""
    from slidechat.template import build_generation_prompt

    out = []
    for q in questions:
        ids = build_generation_prompt(model.tokenizer, q)
        e, _ = model._splice(torch.tensor(ids), None, visual)
        res = model.llm.generate(inputs_embeds=e[None], attention_mask=torch.ones(1, e.shape[0], dtype=torch.long),
                                 max_new_tokens=8, do_sample=False)
        out.append(res[0].tolist())
    return out


def test_generate_batched_equals_one_by_one(model):
    x = feats(30, 5)
    questions = ["What is the diagnosis of this slide?", "Describe the tissue in detail please, with all findings."]
    batched = model.generate(x, questions, max_new_tokens=8)
    single = [model.generate(x, q, max_new_tokens=8) for q in questions]
    assert isinstance(batched, list) and isinstance(single[0], str)
    assert batched == single
    visual = model.encode_slide(x)
    assert model.generate(None, questions[0], visual_embeds=visual, max_new_tokens=8) == single[0]
    # KV-cached greedy decoding agrees with a plain loop over full forwards
    e, _ = model._splice(torch.tensor(build_generation_prompt(model.tokenizer, questions[0])), None, visual)
    seq = []
    for _ in range(4):
        ids_emb = torch.cat([e, model.llm.get_input_embeddings()(torch.tensor(seq, dtype=torch.long))]) if seq else e
        nxt = int(model.llm(inputs_embeds=ids_emb[None]).logits[0, -1].argmax())
        seq.append(nxt)
    assert _generate_ids(model, visual, questions[:1])[0][:4] == seq


def test_generate_with_history_and_without_slide(model):
    x = feats(20, 6)
    visual = model.encode_slide(x)
    history = [("What is the diagnosis?", "Lymphoid tissue with dense sheets of small lymphocytes.")]
    question = "Describe the tissue in detail."
    seen = []
    real = model.llm.generate

    def spy(**kw):
        seen.append(kw["inputs_embeds"][0].clone())
        return real(**kw)

    model.llm.generate = spy
    try:
        with_history = model.generate(None, question, visual_embeds=visual, history=history, max_new_tokens=8)
        without = model.generate(None, "<image>\n" + question, visual_embeds=visual, max_new_tokens=8)
        text_only = model.generate(None, "What is the diagnosis?", max_new_tokens=3)
    finally:
        del model.llm.generate
    # the prompt the LLM saw is the earlier turn (with the slide), its answer, then the question
    prompt = build_generation_prompt(model.tokenizer, question, history)
    expected, _ = model._splice(torch.tensor(prompt), None, visual)
    torch.testing.assert_close(seen[0], expected, atol=0, rtol=0)
    assert seen[0].shape[0] > seen[1].shape[0] + 10
    # ... and it changes the answer
    assert with_history != without
    # without a slide no visual tokens are spliced in
    text_ids = build_generation_prompt(model.tokenizer, "What is the diagnosis?", with_image=False)
    assert IMAGE_TOKEN_INDEX not in text_ids and seen[2].shape[0] == len(text_ids) and isinstance(text_only, str)


# -- save / load ------------------------------------------------------------------------------


def test_save_reload_round_trip_is_identical(model, tmp_path):
    x = feats(25, 7)
    before_vis = model.encode_slide(x)
    before = model.generate(x, ["What is the diagnosis of this slide?", "Describe the tissue."], max_new_tokens=8)
    out = save_model(model, tmp_path / "ckpt")
    meta = json.loads((out / "slidechat_config.json").read_text())
    assert meta["llm_format"] == "full" and meta["config"]["context"] == "slide"
    again = load_model(out)
    assert again.config == model.config
    torch.testing.assert_close(again.encode_slide(x), before_vis, atol=0, rtol=0)
    assert again.generate(x, ["What is the diagnosis of this slide?", "Describe the tissue."], max_new_tokens=8) == before
    for k, v in model.llm.state_dict().items():
        torch.testing.assert_close(again.llm.state_dict()[k], v, atol=0, rtol=0)


def test_save_without_llm_references_base(model, tiny_llm, tmp_path):
    out = save_model(model, tmp_path / "stage1", save_llm=False)
    assert not (out / "llm").exists()
    again = load_model(out)  # base path recorded in the config
    x = feats(9, 8)
    torch.testing.assert_close(again.encode_slide(x), model.encode_slide(x), atol=0, rtol=0)
    meta = json.loads((out / "slidechat_config.json").read_text())
    meta["llm_source"] = str(tmp_path / "gone")
    (out / "slidechat_config.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="llm"):
        load_model(out)
    assert load_model(out, llm=tiny_llm).encode_slide(x).shape == (9, model.config.llm_hidden_size)


def test_a_model_refuses_another_llm_of_the_same_shape(model, tiny_llm, tiny_llm_spec, tmp_path):
    """A stage-1 model (or LoRA adapter) only makes sense on the LLM it was trained with: another LLM of the same
    shape (base vs instruct, another seed) loads without any error and answers nonsense, so it is refused."""
    import shutil

    from wsicore.errors import InputError

    corpus, settings = tiny_llm_spec
    other = build_tiny_llm(tmp_path / "other-llm", corpus, **{**settings, "seed": 1})
    moved = shutil.copytree(tiny_llm, tmp_path / "moved-llm")  # the same LLM elsewhere is fine
    out = save_model(model, tmp_path / "stage1", save_llm=False)
    assert load_model(out, llm=moved).encode_slide(feats(5)).shape[0] == 5
    with pytest.raises(InputError, match="other-llm.*other weights"):
        load_model(out, llm=other)


def test_peft_adapter_round_trip(tiny_llm, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(9)
    m = new_model(tiny_llm, tiny_config())
    m.llm = get_peft_model(m.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    m.eval()
    x = feats(15, 10)
    before = m.generate(x, "What is the diagnosis?", max_new_tokens=6)
    out = save_model(m, tmp_path / "lora")
    assert (out / "llm_adapter").is_dir() and not (out / "llm").exists()
    again = load_model(out, llm=tiny_llm)
    assert again.generate(x, "What is the diagnosis?", max_new_tokens=6) == before


def test_missing_llm_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--llm"):
        new_model(tmp_path / "nope", tiny_config())


def test_benchmark_generation_batches_by_visual_tokens(model, tmp_path):
    import numpy as np

    from preprocessing.stores import write_zarr_store
    from slidechat.benchmarks_io import Benchmark, BenchItem
    from preprocessing.stores import FeatureStoreIndex
    from slidechat.evaluate import EvalSettings, generate_for_benchmark, questions_per_call

    assert questions_per_call(EvalSettings(), 38400) == 1  # one question at a time at SlideChat's inference cap
    assert questions_per_call(EvalSettings(), 10240) == 4 and questions_per_call(EvalSettings(), 500) == 8
    assert questions_per_call(EvalSettings(max_batch_tokens=10), 500) == 1  # never zero
    rng = np.random.default_rng(0)
    for name, n in (("big", 30), ("small", 10)):
        write_zarr_store(tmp_path / f"{name}.zarr", rng.standard_normal((n, FEAT)).astype(np.float32),
                         np.zeros((n, 2), np.int64), None, {"encoder": "test"})
    items = [BenchItem(qid=f"{s}{i}", slide_id=s, question=f"Question {i}?", prompt=f"Question {i}?")
             for s in ("big", "small") for i in range(5)]
    calls = []
    real = model.generate
    model.generate = lambda features, questions, **kw: calls.append(len(questions)) or real(features, questions, **kw)
    try:
        generate_for_benchmark(model, Benchmark("b", "caption_csv", items, []), FeatureStoreIndex(tmp_path),
                               EvalSettings(max_new_tokens=2, max_batch_tokens=70), log=None)
    finally:
        del model.generate
    assert calls == [2, 2, 1, 5]  # 30 visual tokens: 2 questions per call; 10 tokens: all 5 (batch_size 8)
