"""Patch encoders: parity with the official CONCH code, strict checkpoint loading, transforms, registry."""

from __future__ import annotations

import copy
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from preprocessing.encoders import EncoderCheckpointError, build_encoder, checkpoint_sha256
from preprocessing.encoders.conch import CONCH_TINY, CONCH_V1, ConchVisionConfig
from preprocessing.encoders.transforms import OPENAI_MEAN, OPENAI_STD, Preprocess, get_transform
from wsicore.errors import InputError
from wsicore.torchfile import read_state_dict


@pytest.fixture
def conch_factory():
    """The official CONCH model factory; only the tests comparing with it are skipped without it."""
    return pytest.importorskip("conch.open_clip_custom.factory", reason="official CONCH package (conch-fork)")


def official_cfg(v: ConchVisionConfig) -> dict:
    """An official CoCa config with our vision shape and a small text side (the text tower is not compared)."""
    return {
        "embed_dim": v.embed_dim,
        "embed_dim_caption": v.embed_dim_caption,
        "vision_cfg": {
            "image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.layers,
            "num_heads": v.heads, "mlp_ratio": v.mlp_ratio, "attentional_pool_caption": v.caption_pooler,
            "attentional_pool_contrast": True, "attn_pooler_heads": v.pooler_heads, "n_queries_contrast": 1,
            "n_queries_caption": v.n_queries_caption, "output_tokens": True,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1, "embed_cls": True,
                     "output_tokens": True},
        "multimodal_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
        "custom_text": True,
    }


def official_checkpoint(conch_factory, tmp_path, v: ConchVisionConfig, seed: int,
                        via_loader: bool = True) -> tuple[str, torch.nn.Module]:
    """Random weights for the official architecture saved as a `pytorch_model.bin`, and the official model.

    With `via_loader` the official model is rebuilt by the official `create_model` from the file; otherwise
    the seeded official instance itself is returned (saves building a second ViT-B).
    """
    from conch.open_clip_custom.coca_model import CoCa

    cfg = official_cfg(v)
    torch.manual_seed(seed)
    coca_kwargs = {k: copy.deepcopy(val) for k, val in cfg.items() if k != "custom_text"}
    model = CoCa(**coca_kwargs).eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    if via_loader:
        model = conch_factory.create_model(copy.deepcopy(cfg), checkpoint_path=str(path)).eval()
    return str(path), model


def test_conch_tiny_architecture_matches_official_encode_image(conch_factory, tmp_path):
    path, official = official_checkpoint(conch_factory, tmp_path, CONCH_TINY, seed=1)
    ours = build_encoder("conch_tiny", checkpoint=path)
    torch.manual_seed(0)
    x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        ref = official.encode_image(x, proj_contrast=False, normalize=False)
        got = ours(x)
        # a 448 input on the 224 grid exercises the on-the-fly position resampling in both
        ref448 = official.encode_image(torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(2)),
                                       proj_contrast=False, normalize=False)
        got448 = ours(torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(2)))
    assert got.shape == (3, 512)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got448, ref448, atol=1e-5, rtol=1e-5)
    # and the weights really came from the file: the seeded random init gives different features
    with torch.inference_mode():
        assert not torch.allclose(build_encoder("conch_tiny")(x), ref, atol=1e-3)


def test_conch_v1_vit_b16_matches_official_at_224_and_448(conch_factory, tmp_path):
    """Full CONCH ViT-B/16 vision tower on shared random weights (slow-ish: two images per size)."""
    path, official = official_checkpoint(conch_factory, tmp_path, CONCH_V1, seed=3, via_loader=False)
    ours = build_encoder("conch_v1", checkpoint=path, transform="conch_official")
    assert ours.checkpoint_sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert ours.seed is None
    gen = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for size in (224, 448):
            x = torch.randn(1, 3, size, size, generator=gen)
            ref = official.encode_image(x, proj_contrast=False, normalize=False)
            got = ours(x)
            assert got.shape == (1, 512)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_strict_loading_names_bad_missing_and_unknown_keys(conch_factory, tmp_path):
    path, _ = official_checkpoint(conch_factory, tmp_path, CONCH_TINY, seed=1)
    state = read_state_dict(path)

    renamed = dict(state)
    renamed["visual.trunk.blocks.0.attn.qkv.weightX"] = renamed.pop("visual.trunk.blocks.0.attn.qkv.weight")
    torch.save(renamed, tmp_path / "renamed.bin")
    with pytest.raises(InputError) as err:
        build_encoder("conch_tiny", checkpoint=tmp_path / "renamed.bin")
    assert str(tmp_path / "renamed.bin") in str(err.value)
    assert "unexpected keys (1): trunk.blocks.0.attn.qkv.weightX" in str(err.value)
    assert "missing keys (1): trunk.blocks.0.attn.qkv.weight" in str(err.value)

    stray = dict(state)
    stray["adapter.scale"] = torch.zeros(1)
    torch.save(stray, tmp_path / "stray.bin")
    with pytest.raises(InputError, match=r"unexpected keys \(1\): adapter\.scale"):
        build_encoder("conch_tiny", checkpoint=tmp_path / "stray.bin")

    shape = dict(state)
    shape["visual.ln_contrast.weight"] = torch.ones(7)
    torch.save(shape, tmp_path / "shape.bin")
    with pytest.raises(InputError, match=r"shape mismatch \(1\): ln_contrast\.weight \(7,\) \(model \(512,\)\)"):
        build_encoder("conch_tiny", checkpoint=tmp_path / "shape.bin")

    as_int = dict(state)
    as_int["visual.ln_contrast.weight"] = torch.ones(512, dtype=torch.int32)
    torch.save(as_int, tmp_path / "int.bin")
    with pytest.raises(InputError, match=r"wrong dtype \(1\): ln_contrast\.weight torch\.int32"):
        build_encoder("conch_tiny", checkpoint=tmp_path / "int.bin")

    # the official loader accepts the renamed file silently (strict=False): its qkv stays random
    official = conch_factory.create_model(official_cfg(CONCH_TINY), checkpoint_path=str(tmp_path / "renamed.bin"))
    qkv = official.visual.trunk.blocks[0].attn.qkv.weight
    assert qkv.shape == state["visual.trunk.blocks.0.attn.qkv.weight"].shape
    assert not torch.allclose(qkv, state["visual.trunk.blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(official.visual.trunk.blocks[0].attn.proj.weight,
                               state["visual.trunk.blocks.0.attn.proj.weight"], atol=0, rtol=0)

    # a DataParallel-wrapped {"state_dict": {"module.visual...."}} checkpoint is the same weights
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pt")
    a = build_encoder("conch_tiny", checkpoint=tmp_path / "wrapped.pt")
    b = build_encoder("conch_tiny", checkpoint=path)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(a(x), b(x))


def test_missing_or_unreadable_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(EncoderCheckpointError, match="--encoder-checkpoint"):
        build_encoder("conch_v1", checkpoint=tmp_path / "nope.bin")
    with pytest.raises(EncoderCheckpointError, match="--encoder-checkpoint"):
        build_encoder("conch_v1")  # real weights are never silently random
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=f"{junk}: cannot be read as a torch checkpoint"):
        build_encoder("conch_tiny", checkpoint=junk)
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("conch_v9")
    with pytest.raises(ValueError, match="unknown transform"):
        build_encoder("conch_tiny", transform="nope")


def test_conch_tiny_is_seeded_and_described():
    x = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    a, b, c = build_encoder("conch_tiny"), build_encoder("conch_tiny"), build_encoder("conch_tiny", seed=1)
    with torch.inference_mode():
        fa, fb, fc = a(a.preprocess(x)), b(b.preprocess(x)), c(c.preprocess(x))
    assert fa.shape == (2, 512)
    assert torch.equal(fa, fb)
    assert not torch.allclose(fa, fc)
    d = a.describe()
    assert d["encoder"] == "conch_tiny" and d["checkpoint_sha256"] is None and d["seed"] == 0
    assert d["transform"] == "slidechat" and d["transform_spec"]["size"] == 224
    assert d["feature_dim"] == 512 and d["encoder_config"]["width"] == CONCH_TINY.width


def test_slidechat_transform_equals_totensor_normalize():
    """224 px patches at 224 input: no resampling, exactly ToTensor + Normalize(OpenAI)."""
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    ref = T.Compose([T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])(Image.fromarray(img))
    got = Preprocess(get_transform("slidechat"))(torch.from_numpy(img)[None])[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_conch_official_transform_close_to_official_pil_pipeline():
    """224 -> 448 bicubic on the device vs CONCH's PIL transform: same geometry, kernel differs slightly."""
    image_transform = pytest.importorskip("conch.open_clip_custom.transform", reason="official CONCH package").image_transform

    rng = np.random.default_rng(1)
    # smooth image (tissue-like) plus noise: the bicubic kernels differ most on pixel-level noise
    yy, xx = np.mgrid[0:224, 0:224]
    base = 128 + 60 * np.sin(xx / 9.0)[..., None] * np.cos(yy / 13.0)[..., None] * np.array([1.0, 0.6, 0.8])
    img = np.clip(base + rng.normal(0, 8, (224, 224, 3)), 0, 255).astype(np.uint8)
    ref = image_transform(448, mean=OPENAI_MEAN, std=OPENAI_STD)(Image.fromarray(img))
    got = Preprocess(get_transform("conch_official"))(torch.from_numpy(img)[None])[0]
    assert got.shape == ref.shape == (3, 448, 448)
    diff = (got - ref).abs() * torch.tensor(OPENAI_STD).view(3, 1, 1) * 255  # in grey levels
    assert diff.mean() < 2.0, diff.mean()
    assert torch.quantile(diff.flatten(), 0.99) < 10.0
    # a rectangular crop works like torchvision's Resize(int) + CenterCrop
    wide = torch.from_numpy(np.ascontiguousarray(np.concatenate([img, img], axis=1)))[None]
    assert Preprocess(get_transform("conch_official"))(wide).shape == (1, 3, 448, 448)


def test_preprocess_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        Preprocess(get_transform("slidechat"))(torch.zeros(1, 224, 224, 3))


def test_resnet50_trunc_loads_a_full_resnet50_checkpoint(tmp_path):
    import timm

    torch.manual_seed(4)
    full = timm.create_model("resnet50", pretrained=False).eval()
    torch.save(full.state_dict(), tmp_path / "resnet50.pth")  # includes layer4 and fc: dropped on purpose
    enc = build_encoder("resnet50_trunc", checkpoint=tmp_path / "resnet50.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        got = enc(x)
        h = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        ref = full.layer3(full.layer2(full.layer1(h))).mean(dim=(2, 3))
    assert got.shape == (2, 1024)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert enc.transform.name == "imagenet"
    bad = {k.replace("layer2.0.conv1", "layer2.0.convX"): v for k, v in full.state_dict().items()}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(InputError, match=r"missing keys \(1\): layer2\.0\.conv1\.weight"):
        build_encoder("resnet50_trunc", checkpoint=tmp_path / "bad.pth")
    # BatchNorm's integer step counters are integers in the model too: the same weights as safetensors load
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "resnet50.safetensors"))
    with torch.inference_mode():
        torch.testing.assert_close(build_encoder("resnet50_trunc", checkpoint=tmp_path / "resnet50.safetensors")(x), got)


def test_any_timm_model_by_name_from_a_local_checkpoint(tmp_path):
    import timm

    torch.manual_seed(6)
    full = timm.create_model("resnet18", pretrained=False).eval()
    torch.save(full.state_dict(), tmp_path / "r18.pth")
    enc = build_encoder("timm:resnet18", checkpoint=tmp_path / "r18.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), full.forward_head(full.forward_features(x), pre_logits=True))
    assert enc.feature_dim == 512 and enc.transform.name == "timm:resnet18"
    with pytest.raises(EncoderCheckpointError, match="--encoder-checkpoint"):
        build_encoder("timm:resnet18")
    with pytest.raises(ValueError, match="no_such_model"):
        build_encoder("timm:no_such_model", allow_random=True)


def test_checkpoint_sha256_is_cached_by_path_mtime_size(tmp_path, monkeypatch):
    from preprocessing import encoders

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    encoders._file_sha256.cache_clear()
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    digest = checkpoint_sha256(f)
    assert digest == hashlib.sha256(b"abc" * 1000).hexdigest()
    cache = json.loads((tmp_path / "cache" / "wsi-slidechat" / "checkpoint_sha256.json").read_text())
    assert list(cache.values()) == [digest]
    # a cached entry is trusted (no re-hash) while path, mtime and size are unchanged ...
    key = next(iter(cache))
    cache[key] = "0" * 64
    (tmp_path / "cache" / "wsi-slidechat" / "checkpoint_sha256.json").write_text(json.dumps(cache))
    encoders._file_sha256.cache_clear()
    assert checkpoint_sha256(f) == "0" * 64
    # ... and a changed file is re-hashed
    f.write_bytes(b"abd" * 1000)
    os.utime(f, ns=(1, 10**9))
    assert checkpoint_sha256(f) == hashlib.sha256(b"abd" * 1000).hexdigest()  # new (mtime, size): not memoised
