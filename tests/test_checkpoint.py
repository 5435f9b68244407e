"""Strict loading of released-SlideChat-style checkpoints (DeepSpeed folder, .pth, xtuner layout) and conversion.

Attacks on these loaders (gadgets in every format) are in test_untrusted_files.py.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from slidechat.checkpoint import load_model, new_model
from slidechat.model import SlideChat, SlideChatConfig
from wsicore.errors import InputError, UnsafeFileError
from wsicore.torchfile import Stub, read_torch_file

FEAT = 32
FAKE_MODULE = "mmengine.logging.history_buffer"


def tiny_config(**kw) -> SlideChatConfig:
    base = dict(feature_dim=FEAT, encoder_ffn_dim=64, encoder_heads=4, segment_lengths=[4, 8, 16],
                dilated_ratios=[1, 2, 4], context="per_patch")
    base.update(kw)
    return SlideChatConfig(**base)


class HistoryBuffer:
    """Stands in for mmengine's HistoryBuffer (numpy arrays inside); pickled under a module name absent here."""

    def __init__(self) -> None:
        self._log_history = np.array([1.0, 2.0])
        self._count_history = np.array([1, 1])
        self.max_length = 1000000


class Exploit:
    """Unpickling this with a normal unpickler would run os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _save_with_foreign_objects(obj, path: Path, zip_format: bool = True) -> None:
    """torch.save `obj` while HistoryBuffer pretends to live in mmengine (then forget that module)."""
    fake = types.ModuleType(FAKE_MODULE)
    fake.HistoryBuffer = HistoryBuffer
    old_module = HistoryBuffer.__module__
    HistoryBuffer.__module__ = FAKE_MODULE
    parents = ["mmengine", "mmengine.logging"]
    for name in parents:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[FAKE_MODULE] = fake
    try:
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    finally:
        HistoryBuffer.__module__ = old_module
        for name in [FAKE_MODULE, *parents]:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def source(tiny_llm) -> SlideChat:
    """A model whose weights play the role of the released ones (LLM perturbed so it differs from the base)."""
    torch.manual_seed(0)
    m = new_model(tiny_llm, tiny_config())
    with torch.no_grad():
        for p in m.llm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def released_state(model: SlideChat, with_llm: bool = True) -> dict[str, torch.Tensor]:
    """State dict in the original layout: LongNet_encoder.*, projector.model.{0,2}.*, llm.*."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if with_llm or not k.startswith("llm.")}
    assert any(k.startswith("projector.model.0.") for k in sd) and any(k.startswith("projector.model.2.") for k in sd)
    return sd


def deepspeed_folder(model: SlideChat, root: Path, marker: Path | None = None, with_llm: bool = True,
                     zip_format: bool = True) -> Path:
    """A released-style DeepSpeed folder; `zip_format=False` writes torch's legacy format (older DeepSpeed)."""
    folder = root / "stage2_pth"
    folder.mkdir(parents=True)
    payload = {
        "module": released_state(model, with_llm),
        "buffer_names": [],
        "optimizer": None,
        "global_steps": 1234,
        "ds_version": "0.14.0",
        "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}, "runtime_info": {"iter": np.int64(7)}},
        "meta": {"epoch": 2, "cfg": "..."},
    }
    if marker is not None:
        payload["evil"] = Exploit(marker)
    _save_with_foreign_objects(payload, folder / "mp_rank_00_model_states.pt", zip_format)
    return folder


def _same_outputs(a: SlideChat, b: SlideChat) -> None:
    x = torch.randn(21, FEAT, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.encode_slide(x), b.encode_slide(x), atol=1e-6, rtol=1e-6)
    q = ["What is the diagnosis of this slide?", "Stroma."]
    assert a.generate(x, q, max_new_tokens=6) == b.generate(x, q, max_new_tokens=6)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_deepspeed_folder_loads_strictly_without_importing_foreign_classes(source, tiny_llm, tmp_path, zip_format):
    folder = deepspeed_folder(source, tmp_path, zip_format=zip_format)
    assert "mmengine" not in sys.modules
    loaded = load_model(folder, llm=tiny_llm, config=tiny_config())
    assert "mmengine" not in sys.modules and FAKE_MODULE not in sys.modules
    assert loaded.config.context == "per_patch" and loaded.llm_weights_loaded
    _same_outputs(source, loaded)
    # the LLM weights came from the checkpoint, not from the base directory
    base = new_model(tiny_llm, tiny_config())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base.llm.state_dict()[name], loaded.llm.state_dict()[name])
    torch.testing.assert_close(loaded.llm.state_dict()[name], source.llm.state_dict()[name], atol=0, rtol=0)
    # the mmengine history buffer and the numpy values in it are inert stubs keeping what was pickled
    raw = read_torch_file(folder / "mp_rank_00_model_states.pt")
    buf = raw["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buf, Stub) and buf.stub_of == f"{FAKE_MODULE}.HistoryBuffer"
    assert buf.state["max_length"] == 1000000 and buf.state["_log_history"].stub_of.endswith("multiarray._reconstruct")
    assert raw["global_steps"] == 1234 and raw["ds_version"] == "0.14.0"
    # the file itself, and the folder one level above, give the same model
    x = torch.randn(9, FEAT)
    for path in (folder / "mp_rank_00_model_states.pt", tmp_path):
        again = load_model(path, llm=tiny_llm, config=tiny_config())
        torch.testing.assert_close(again.encode_slide(x), source.encode_slide(x), atol=1e-6, rtol=1e-6)


def test_os_system_in_a_zip_checkpoint_is_refused_and_never_runs(source, tiny_llm, tmp_path):
    marker = tmp_path / "pwned"
    folder = deepspeed_folder(source, tmp_path, marker)
    with pytest.raises(UnsafeFileError, match=r"mp_rank_00_model_states\.pt: refused: .*posix\.system"):
        load_model(folder, llm=tiny_llm, config=tiny_config())
    assert not marker.exists(), "os.system must never be called"
    assert "mmengine" not in sys.modules


def test_context_is_forced_to_per_patch_for_released_weights(source, tiny_llm, tmp_path):
    path = tmp_path / "flat.pth"
    torch.save(released_state(source), path)
    loaded = load_model(path, llm=tiny_llm, config=tiny_config(context="slide"))
    assert loaded.config.context == "per_patch"


@pytest.mark.parametrize("nesting", ["flat", "state_dict", "module"])
def test_plain_pth_variants(source, tiny_llm, tmp_path, nesting):
    sd = released_state(source)
    obj = sd if nesting == "flat" else {nesting: sd, "meta": {"note": "x"}}
    path = tmp_path / "model.pth"
    torch.save(obj, path)
    _same_outputs(source, load_model(path, llm=tiny_llm, config=tiny_config()))


def test_missing_extra_and_misshaped_keys_fail_clearly(source, tiny_llm, tmp_path):
    sd = released_state(source)
    cases = {
        "missing": {k: v for k, v in sd.items() if k != "LongNet_encoder.layers.1.ffn.fc2.bias"},
        "extra": {**sd, "LongNet_encoder.layers.0.self_attn.rel_pos.weight": torch.zeros(3)},
        "outside": {**sd, "visual_encoder.weight": torch.zeros(3)},
        "llm_missing": {k: v for k, v in sd.items() if k != "llm.model.norm.weight"},
        "shape": {**sd, "projector.model.2.bias": torch.zeros(5)},
    }
    expect = {
        "missing": "layers.1.ffn.fc2.bias",
        "extra": "rel_pos.weight",
        "outside": "visual_encoder.weight",
        "llm_missing": "model.norm.weight",
        "shape": "model.2.bias",
    }
    for name, state in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save({"module": state}, path)
        with pytest.raises(InputError, match=expect[name].replace(".", r"\.")) as err:
            load_model(path, llm=tiny_llm, config=tiny_config())
        assert str(path) in str(err.value)


def test_stage1_checkpoint_without_llm_keys_uses_base_llm(source, tiny_llm, tmp_path):
    folder = deepspeed_folder(source, tmp_path, with_llm=False)
    loaded = load_model(folder, llm=tiny_llm, config=tiny_config())
    assert not loaded.llm_weights_loaded
    x = torch.randn(8, FEAT)
    torch.testing.assert_close(loaded.encode_slide(x), source.encode_slide(x), atol=1e-6, rtol=1e-6)


def test_released_checkpoint_needs_llm_dir(source, tmp_path):
    path = tmp_path / "m.pth"
    torch.save(released_state(source), path)
    with pytest.raises(InputError, match="--llm"):
        load_model(path, llm=None, config=tiny_config())


def test_xtuner_save_pretrained_layout(source, tiny_llm, tmp_path):
    from safetensors.torch import save_file

    root = tmp_path / "xtuner_hf"
    (root / "LongNet_encoder").mkdir(parents=True)
    (root / "projector").mkdir()
    enc = {k[len("LongNet_encoder."):]: v.contiguous() for k, v in source.state_dict().items() if k.startswith("LongNet_encoder.")}
    proj = {k[len("projector."):]: v.contiguous() for k, v in source.state_dict().items() if k.startswith("projector.")}
    torch.save(enc, root / "LongNet_encoder" / "pytorch_model.bin")
    save_file(proj, str(root / "projector" / "model.safetensors"))
    (root / "projector" / "config.json").write_text(json.dumps(
        {"model_type": "projector", "visual_hidden_size": FEAT, "llm_hidden_size": source.config.llm_hidden_size, "depth": 2}))
    source.llm.save_pretrained(root)  # stage 2: xtuner writes the trained LLM at the top level
    source.tokenizer.save_pretrained(root)
    loaded = load_model(root, config=tiny_config())
    _same_outputs(source, loaded)


def test_convert_checkpoint_cli_writes_safetensors_dir(source, tiny_llm, tmp_path, capsys):
    from slidechat.cli import main

    folder = deepspeed_folder(source, tmp_path / "src")
    dst = tmp_path / "converted"
    assert main(["convert-checkpoint", str(folder), str(dst), "--llm", str(tiny_llm), "--num-heads", "4"]) == 0
    files = {p.suffix for p in dst.rglob("*") if p.is_file()}
    assert ".safetensors" in files and not files & {".pt", ".pth", ".bin"}
    meta = json.loads((dst / "slidechat_config.json").read_text())
    assert meta["llm_format"] == "full" and meta["config"]["context"] == "per_patch"
    assert meta["config"]["encoder_heads"] == 4
    # heads are not in the weights: --num-heads and the config must agree with the source
    loaded = load_model(dst)
    assert loaded.config.segment_lengths == [1024, 2048, 4096, 8192, 16384]  # default (not in weights)
    x = torch.randn(13, FEAT)
    # per_patch outputs do not depend on segment lengths (every sequence has length 1)
    torch.testing.assert_close(loaded.encode_slide(x), source.encode_slide(x), atol=1e-6, rtol=1e-6)
    capsys.readouterr()
    assert main(["convert-checkpoint", str(tmp_path / "nothing"), str(tmp_path / "x"), "--llm", str(tiny_llm)]) == 2
    err = capsys.readouterr().err
    assert err == f"slidechat convert-checkpoint: error: checkpoint not found: {tmp_path / 'nothing'}\n"
    assert not (tmp_path / "x").exists()


def test_our_directory_refuses_int_or_non_finite_slide_encoder_weights(source, tmp_path):
    from safetensors.torch import load_file, save_file

    from slidechat.checkpoint import save_model

    saved = save_model(source, tmp_path / "ours")
    weights = saved / "slide_encoder.safetensors"
    clean = load_file(str(weights))
    key = "LongNet_encoder.layers.0.ffn.fc1.weight"
    x = torch.randn(7, FEAT)
    torch.testing.assert_close(load_model(saved).encode_slide(x), source.encode_slide(x), atol=1e-6, rtol=1e-6)
    cases = {"int": (clean[key] * 100).to(torch.int64),
             "nan": clean[key].clone().index_fill_(1, torch.tensor([2]), float("nan")),
             "inf": clean[key].clone().index_fill_(0, torch.tensor([0]), -float("inf"))}
    expect = {"int": r"wrong dtype \(1\): " + key.replace(".", r"\.") + r" torch\.int64 \(model torch\.float32\)",
              "nan": r"NaN or infinite values \(1\): " + key.replace(".", r"\."),
              "inf": r"NaN or infinite values \(1\): " + key.replace(".", r"\.")}
    for name, bad in cases.items():
        save_file({**clean, key: bad}, str(weights))
        with pytest.raises(InputError, match=rf"{weights}: .*{expect[name]}"):
            load_model(saved)
