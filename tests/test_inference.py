"""`slidechat ask` / `chat` end to end on a real slide with a tiny patch encoder and a tiny SlideChat."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from slidechat.cli import main as cli
from slidechat.evaluate import load_slide_tensor
from slidechat.inference import chat_loop, model_feature_config
from slidechat.checkpoint import load_model, new_model, save_model
from slidechat.model import SlideChatConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llm) -> Path:
    root = tmp_path_factory.mktemp("ask")
    torch.manual_seed(0)
    cfg = SlideChatConfig(feature_dim=512, encoder_layers=1, encoder_ffn_dim=64, encoder_heads=4,
                          segment_lengths=[16, 32], dilated_ratios=[1, 2])
    out = save_model(new_model(tiny_llm, cfg), root / "model")
    # the patch encoder the model was trained on, recorded beside it (read when --encoder is not given)
    (out / "features.json").write_text(json.dumps({"feature_encoder": "conch_tiny", "feature_target_mpp": 0.5,
                                                   "feature_patch_size": 224}))
    return out


def test_model_feature_config_reads_recorded_keys(tmp_path):
    (tmp_path / "slidechat_config.json").write_text(json.dumps({"config": {}, "features": {
        "encoder": "conch_v1", "transform": "conch_official", "target_mpp": 0.5}}))
    assert model_feature_config(tmp_path) == {"feature_encoder": "conch_v1", "feature_transform": "conch_official",
                                              "feature_target_mpp": 0.5}
    assert model_feature_config(tmp_path / "absent") == {}


def test_ask_end_to_end_on_cmu_small(cmu_small, model_dir, tmp_path, capsys):
    work = tmp_path / "cache"
    argv = ["ask", "--slide", str(cmu_small), "--question", "What tissue is shown in this slide?",
            "--model", str(model_dir), "--work-dir", str(work), "--max-new-tokens", "8", "--device", "cpu"]
    assert cli(argv) == 0
    out = capsys.readouterr()
    answer = out.out.strip()
    assert answer  # a tiny random model says something; the point is the whole chain ran
    assert "segmenting" in out.err and "tiling" in out.err
    stores = list(work.glob("features-conch_tiny-*/CMU-1-Small-Region.zarr"))
    assert len(stores) == 1
    feats = load_slide_tensor(stores[0])
    assert feats.shape[1] == 512 and feats.shape[0] > 10
    mask = work / "segmentation" / "CMU-1-Small-Region_mask.png"
    coords = next(work.glob("tiles-*/CMU-1-Small-Region.h5"))
    stamps = (mask.stat().st_mtime_ns, coords.stat().st_mtime_ns)

    # second call: cached segmentation/tiling/features reused, same greedy answer, two questions batched
    assert cli(argv[:4] + ["What tissue is shown in this slide?", "Is there necrosis?"] + argv[5:]) == 0
    out2 = capsys.readouterr()
    assert "segmenting" not in out2.err and "tiling" not in out2.err
    assert (mask.stat().st_mtime_ns, coords.stat().st_mtime_ns) == stamps
    assert out2.out.count("Q: ") == 2
    assert f"A: {answer}\n" in out2.out


def test_chat_keeps_history(model_dir, tmp_path):
    from slidechat.template import build_generation_prompt

    model = load_model(model_dir).eval()
    feats = torch.randn(30, 512, generator=torch.Generator().manual_seed(0))
    seen, prompts = [], []
    orig, llm_generate = model.generate, model.llm.generate

    def spy(features, question, **kw):
        seen.append((question, list(kw.get("history") or [])))
        return orig(features, question, **kw)

    def llm_spy(**kw):
        prompts.append(kw["inputs_embeds"][0].clone())
        return llm_generate(**kw)

    model.generate, model.llm.generate = spy, llm_spy
    stdin = io.StringIO("What tissue is shown?\n\nIs there necrosis?\nexit\nnever asked\n")
    stdout = io.StringIO()
    assert chat_loop(model, feats, max_new_tokens=6, stdin=stdin, stdout=stdout) == 2
    assert seen[0] == ("<image>\nWhat tissue is shown?", [])
    answers = [line.removeprefix("slidechat> ").strip() for line in stdout.getvalue().split("you> ") if line][:2]
    assert len(answers) == 2 and seen[1] == ("Is there necrosis?", [("<image>\nWhat tissue is shown?", answers[0])])
    # the second prompt the LLM saw is the first turn (slide, question, the answer given), then the new question
    with torch.inference_mode():
        visual = model.encode_slide(feats)
        ids = build_generation_prompt(model.tokenizer, "Is there necrosis?", seen[1][1])
        expected, _ = model._splice(torch.tensor(ids), None, visual)
        alone, _ = model._splice(torch.tensor(build_generation_prompt(model.tokenizer, "Is there necrosis?")), None,
                                 visual)
        torch.testing.assert_close(prompts[1], expected, atol=0, rtol=0)
        # ... so that the answer's distribution is not the one of the question asked alone
        after = torch.softmax(model.llm(inputs_embeds=expected[None]).logits[0, -1], -1)
        first = torch.softmax(model.llm(inputs_embeds=alone[None]).logits[0, -1], -1)
    assert (after - first).abs().sum() > 1e-3


def test_chat_commands_with_a_slash_blank_lines_and_eof(model_dir):
    """`/reset` and `/exit` (as in other chat tools) are commands, not questions for the model; blank lines are
    skipped; a last line without a newline is still asked."""
    model = load_model(model_dir).eval()
    feats = torch.randn(12, 512, generator=torch.Generator().manual_seed(0))
    seen = []
    orig = model.generate

    def spy(features, question, **kw):
        seen.append((question, list(kw.get("history") or [])))
        return orig(features, question, **kw)

    model.generate = spy
    stdout = io.StringIO()
    asked = chat_loop(model, feats, 4, stdin=io.StringIO("What tissue?\n  \n/reset\nIs there necrosis?"), stdout=stdout)
    assert asked == 2 and [q for q, _ in seen] == ["<image>\nWhat tissue?", "<image>\nIs there necrosis?"]
    assert seen[1][1] == [] and "(conversation reset" in stdout.getvalue()
    seen.clear()
    assert chat_loop(model, feats, 4, stdin=io.StringIO("/EXIT\nnever asked\n"), stdout=io.StringIO()) == 0
    assert seen == []


def test_ask_errors_are_clear(model_dir, cmu_small, tmp_path, capsys):
    assert cli(["ask", "--slide", str(cmu_small), "--question", "q", "--model", str(model_dir),
                "--encoder", "conch_v1", "--work-dir", str(tmp_path / "w")]) == 2
    assert "--encoder-checkpoint" in capsys.readouterr().err
    assert cli(["ask", "--slide", str(tmp_path / "none.svs"), "--question", "q", "--model", str(model_dir),
                "--work-dir", str(tmp_path / "w")]) == 2
    assert "--slide" in capsys.readouterr().err


def test_model_feature_config_falls_back_to_the_training_stores(tmp_path):
    import numpy as np

    from preprocessing.stores import write_zarr_store

    store = write_zarr_store(tmp_path / "feats" / "S1.zarr", np.zeros((2, 512), np.float32),
                             np.zeros((2, 2), np.int64), None,
                             {"encoder": "conch_tiny", "transform": "slidechat", "target_mpp": 0.5, "patch_size": 224})
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"id": "0", "features": str(store)}]))
    model = tmp_path / "model"
    model.mkdir()
    (model / "training_config.json").write_text(json.dumps({"data": str(data), "features_dir": None}))
    assert model_feature_config(model) == {"feature_encoder": "conch_tiny", "feature_transform": "slidechat",
                                           "feature_target_mpp": 0.5, "feature_patch_size": 224}


def test_ask_on_a_given_store_with_old_flag_names_says_demo_and_refuses_other_features(model_dir, cmu_small,
                                                                                          tmp_path, capsys):
    """`--checkpoint`/`--seg-preset` still work (hidden); a demo-trained model says so; a store made with another
    encoder than the model's training stores (its model card) is refused, naming both."""
    import shutil

    import numpy as np

    from preprocessing.stores import write_zarr_store
    from slidechat.model_card import CARD_JSON

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    card = {"stage": 2, "synthetic_demo": True,
            "features": {"encoder": "conch_tiny", "target_mpp": 0.5, "patch_size": 224}}
    (model / CARD_JSON).write_text(json.dumps(card))
    rng = np.random.default_rng(0)
    coords = np.stack([np.arange(30) * 224, np.zeros(30, np.int64)], 1)
    attrs = {"slide_id": "S", "encoder": "conch_tiny", "target_mpp": 0.5, "patch_size": 224}
    good = write_zarr_store(tmp_path / "good" / "S.zarr", rng.normal(size=(30, 512)), coords, None, attrs)
    other = write_zarr_store(tmp_path / "other" / "S.zarr", rng.normal(size=(30, 512)), coords, None,
                             {**attrs, "encoder": "uni_v1"})
    argv = ["ask", "--slide", str(cmu_small), "--question", "What tissue is shown?", "--checkpoint", str(model),
            "--seg-preset", "clam", "--max-new-tokens", "3", "--device", "cpu", "--features"]
    assert cli(argv + [str(good)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "trained on the synthetic demo data" in out.err
    assert cli(argv + [str(other)]) == 2
    err = capsys.readouterr().err
    assert f"{other}: made with encoder 'uni_v1'" in err and f"the model {model}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_the_slide_cache_is_keyed_by_the_mpp_override(cmu_small, tmp_path):
    """`ask --mpp X` after a run without it (or with another value) must not reuse patches tiled at the other
    µm/px: the cached coords fix the geometry, and reusing them answered at the wrong scale."""
    from preprocessing.stores import load_features
    from slidechat.inference import FeatureSettings, prepare_slide

    fs = FeatureSettings(encoder="conch_tiny")
    first = load_features(prepare_slide(cmu_small, fs, tmp_path, log=lambda m: None)).attrs
    second = load_features(prepare_slide(cmu_small, fs, tmp_path, mpp=0.45, log=lambda m: None)).attrs
    assert first["mpp_level0"] == pytest.approx(0.499) and first["mpp_override"] is None
    assert second["mpp_level0"] == pytest.approx(0.45) and second["mpp_override"] == pytest.approx(0.45)
    assert second["n_patches"] != first["n_patches"]
