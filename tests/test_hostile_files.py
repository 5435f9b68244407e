"""Hostile files, second round: bombs, damaged archives and lies that the first readers let through.

Each test builds the file as an attacker (or a clumsy user) would, shows that the reader refuses it with
one error naming the file, and that nothing was allocated, hung or changed on the way.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from test_untrusted_files import ENV, legacy_with_pickle, zip_with_pickle
from wsicore.errors import InputError, UnsafeFileError
from wsicore.torchfile import load_strict, read_torch_file


def _long(v: int) -> bytes:
    return b"\x8a\x08" + v.to_bytes(8, "little", signed=True)


@pytest.mark.parametrize("writer", [zip_with_pickle, legacy_with_pickle], ids=["zip", "legacy"])
def test_bytearray_bomb_is_refused_before_anything_is_allocated(tmp_path, writer):
    # 40 bytes that ask for a zero-filled 1 TB buffer: bytearray(N) through REDUCE
    f = writer(tmp_path / "bomb.pt", b"\x80\x02c__builtin__\nbytearray\nq\x00" + _long(1 << 40) + b"\x85R.")
    with pytest.raises(UnsafeFileError, match=rf"{f}: refused: its pickle names builtins\.bytearray"):
        read_torch_file(f)


def _run_isolated(code: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter: a hang or a crash must not take the test process with it."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=timeout,
                          cwd=Path(__file__).parent)


@pytest.mark.parametrize("kind", ["shared", "deep"])
def test_pickle_structure_bombs_are_refused_quickly(tmp_path, kind):
    if kind == "shared":  # a dict key t40 with t(i+1) = (t(i), t(i)): 160 bytes, 2**40 tuples to hash
        body = b"\x80\x02}K\x00" + b"q\x00h\x00\x86" * 40 + b"K\x01s."
    else:  # a key nested 3 million tuples deep: hashing it overflows the C stack (segfault)
        body = b"\x80\x02}K\x00" + b"\x85" * 3_000_000 + b"K\x01s."
    f = zip_with_pickle(tmp_path / f"{kind}.pt", body)
    run = _run_isolated("import sys\nfrom wsicore.torchfile import read_torch_file\nfrom wsicore.errors import "
                        f"UnsafeFileError\ntry:\n    read_torch_file({str(f)!r})\nexcept UnsafeFileError as e:\n"
                        "    print('REFUSED', e)\n")
    assert run.returncode == 0 and run.stdout.startswith(f"REFUSED {f}: refused: "), run.stdout + run.stderr
    assert ("nested more than" if kind == "deep" else "elements") in run.stdout


def test_ordinary_nesting_and_sharing_still_read(tmp_path):
    # what real checkpoints hold: configs nested a few levels, one tuple shared by many entries
    shared = (0.9, 0.999)
    obj = {"cfg": {"a": {"b": {"c": [1, 2, {"d": (3, 4)}]}}}, "groups": [{"betas": shared} for _ in range(5000)],
           "w": torch.ones(3)}
    for zip_format in (True, False):
        torch.save(obj, tmp_path / "ok.pt", _use_new_zipfile_serialization=zip_format)
        back = read_torch_file(tmp_path / "ok.pt")
        assert back["cfg"] == obj["cfg"] and len(back["groups"]) == 5000 and torch.equal(back["w"], obj["w"])


def _rezipped(src: Path, dst: Path, compression: int) -> Path:
    """`src` unpacked and packed again with `compression`, as `zip -r` or an archive manager does."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    return dst


def test_rezipped_checkpoint_is_refused_not_read_as_garbage(tmp_path):
    torch.save({"w": torch.arange(6.0)}, tmp_path / "w.pt")
    stored = _rezipped(tmp_path / "w.pt", tmp_path / "stored.pt", zipfile.ZIP_STORED)
    assert torch.equal(read_torch_file(stored)["w"], torch.arange(6.0))  # re-packing as torch does is fine
    f = _rezipped(tmp_path / "w.pt", tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    with pytest.raises(InputError, match=rf"{f}: .*compressed"):  # memory-mapped, its bytes were read raw
        read_torch_file(f)


def test_load_strict_does_not_scan_a_huge_tensor_of_the_wrong_shape(tmp_path):
    # 8 bytes of storage seen as a 2**17 x 2**17 tensor (stride 0): checking its values would allocate 16 GiB
    huge = torch.zeros(1).expand(1 << 17, 1 << 17)
    with pytest.raises(InputError, match=r"shape mismatch \(1\): weight \(131072, 131072\)"):
        load_strict(torch.nn.Linear(2, 2, bias=False), {"weight": huge}, "huge.pt")


# ----------------------------------------------------------------------------- LLM and adapter folders


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _pickled_llm_dir(tiny_llm: Path, dst: Path, extra: dict | None = None) -> Path:
    """The tiny LLM saved the pre-safetensors way: its weights in pytorch_model.bin (a torch pickle)."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(tiny_llm, dst)
    weights = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    torch.save({**weights, **(extra or {})}, dst / "pytorch_model.bin")
    return dst


def test_llm_dir_with_pickled_weights_is_read_by_our_reader(tiny_llm, tmp_path):
    from slidechat.checkpoint import new_model

    pickled = _pickled_llm_dir(tiny_llm, tmp_path / "bin-llm")
    ref, back = new_model(tiny_llm), new_model(pickled)
    for (k, a), (k2, b) in zip(ref.llm.state_dict().items(), back.llm.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # a gadget in it is refused by our reader (transformers would have unpickled the file itself)
    marker = tmp_path / "pwned"
    evil = _pickled_llm_dir(tiny_llm, tmp_path / "evil-llm", {"x": _Exploit(marker)})
    with pytest.raises(UnsafeFileError, match=rf"{evil / 'pytorch_model.bin'}: refused: .*posix\.system"):
        new_model(evil)
    assert not marker.exists()


def test_llm_dir_with_remote_code_or_without_weights_is_a_clear_error(tiny_llm, tmp_path):
    import json
    import shutil

    from slidechat.checkpoint import MissingCheckpointError, new_model

    remote = shutil.copytree(tiny_llm, tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="evil_model", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (remote / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "pwned"
    (remote / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    with pytest.raises(InputError, match=rf"{remote}: "):
        new_model(remote)
    assert not marker.exists()
    empty = shutil.copytree(tiny_llm, tmp_path / "no-weights")
    (empty / "model.safetensors").unlink()
    with pytest.raises(MissingCheckpointError, match=rf"{empty}: "):
        new_model(empty)


def _lora_model_dir(tiny_llm: Path, out: Path) -> Path:
    """Our model directory with a LoRA adapter (`llm_adapter/`) on the tiny LLM."""
    from slidechat.checkpoint import new_model, save_model
    from slidechat.model import SlideChatConfig

    peft = pytest.importorskip("peft")
    model = new_model(tiny_llm, SlideChatConfig(encoder_layers=1, encoder_ffn_dim=32, encoder_heads=4))
    model.llm = peft.get_peft_model(model.llm, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    return save_model(model, out)


def test_pickled_peft_adapter_is_refused(tiny_llm, tmp_path):
    from peft import PeftModel

    from slidechat.checkpoint import load_model

    out = _lora_model_dir(tiny_llm, tmp_path / "lora")
    assert isinstance(load_model(out).llm, PeftModel)
    adapter = out / "llm_adapter"
    from safetensors.torch import load_file

    torch.save(load_file(str(adapter / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match=rf"{adapter}: .*adapter_model\.safetensors"):
        load_model(out)


# ----------------------------------------------------------------------------- output folders


def test_an_output_path_that_names_a_users_folder_is_refused_not_emptied(tiny_llm, tmp_path, capsys):
    from slidechat.checkpoint import new_model, save_model
    from slidechat.cli import main as slidechat_cli
    from slidechat.model import SlideChatConfig

    model = new_model(tiny_llm, SlideChatConfig(encoder_layers=1, encoder_ffn_dim=32, encoder_heads=4))
    folder = tmp_path / "my-models"  # `--out my-models` meaning "into my-models/"
    (folder / "older").mkdir(parents=True)
    (folder / "older" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=rf"{folder}: exists and is not .*slidechat_config\.json"):
        save_model(model, folder)
    assert (folder / "older" / "notes.txt").read_text() == "keep me"
    # a model directory written before is replaced, and so is an empty folder
    first = save_model(model, tmp_path / "stage1")
    assert save_model(model, first) == first and (first / "slidechat_config.json").is_file()
    (tmp_path / "empty").mkdir()
    assert (save_model(model, tmp_path / "empty") / "slidechat_config.json").is_file()
    # the same through the command line, and for `slidechat train --out` before any training starts
    ckpt = tmp_path / "released.pt"
    torch.save({"module": {f"LongNet_encoder.{k}": v for k, v in model.LongNet_encoder.state_dict().items()}
                | {f"projector.{k}": v for k, v in model.projector.state_dict().items()}}, ckpt)
    capsys.readouterr()
    assert slidechat_cli(["convert-checkpoint", str(ckpt), str(folder), "--llm", str(tiny_llm),
                          "--num-heads", "4"]) == 2
    assert f"{folder}: exists and is not" in capsys.readouterr().err
    data = tmp_path / "train.json"
    data.write_text("[]")
    assert slidechat_cli(["train", "--stage", "1", "--llm", str(tiny_llm), "--data", str(data), "--out", str(folder),
                          "--work-dir", str(tmp_path / "work")]) == 2
    assert f"{folder}: exists and is not" in capsys.readouterr().err
    assert (folder / "older" / "notes.txt").read_text() == "keep me" and not (tmp_path / "work").exists()


# ----------------------------------------------------------------------------- legacy-format storages


def _legacy_parts(obj) -> tuple[bytes, bytes, bytes]:
    """A legacy-format torch file of `obj` as (first three pickles, object pickle, storage keys and data)."""
    import pickletools

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    raw, ends = buf.getvalue(), []
    buf.seek(0)
    for _ in range(4):
        for _op in pickletools.genops(buf):
            pass
        ends.append(buf.tell())
    return raw[:ends[2]], raw[ends[2]:ends[3]], raw[ends[3]:]


def test_legacy_storage_larger_than_the_file_is_refused(tmp_path):
    head, obj, rest = _legacy_parts({"w": torch.arange(6.0)})
    n = 200_000_000  # the storage and the tensor claim 800 MB; the file holds 24 bytes of data
    lie = obj.replace(b"K\x06N", b"J" + n.to_bytes(4, "little") + b"N").replace(
        b"K\x00K\x06\x85", b"K\x00J" + n.to_bytes(4, "little") + b"\x85")
    f = tmp_path / "lie.pt"
    f.write_bytes(head + lie + b"\x80\x02]q\x00.")  # and lists no storage to read
    with pytest.raises(InputError, match=rf"{f}: .*storages of 800,000,000 bytes.*file of {f.stat().st_size} bytes"):
        read_torch_file(f)


def test_legacy_storage_the_file_does_not_fill_holds_zeros_not_process_memory(tmp_path):
    head, obj, _rest = _legacy_parts({"w": torch.arange(6.0)})
    f = tmp_path / "unfilled.pt"
    f.write_bytes(head + obj + b"\x80\x02]q\x00." + b"\x00" * 32)  # no storage key listed: never read
    for _ in range(20):  # small storages come from reused heap memory, which holds whatever was there
        noise = [torch.full((6,), 1e6) for _ in range(100)]
        del noise
        assert not read_torch_file(f)["w"].any()


# ----------------------------------------------------------------------------- encoder names


@pytest.mark.parametrize("name", ["timm:hf-hub:timm/resnet18.a1_in1k", "timm:local-dir:/tmp/some-model",
                                  "timm:no_such_model", "conch_v9"])
def test_encoder_names_that_would_download_or_do_not_exist_are_config_errors(name):
    from preprocessing.encoders import build_encoder
    from wsicore.errors import ConfigError

    with pytest.raises(ConfigError, match=name.removeprefix("timm:").split("/")[0]):
        build_encoder(name, allow_random=True)  # at once: no request to the hub is even tried


def test_conch_position_grid_of_an_absurd_size_is_refused_not_resampled(tmp_path):
    from safetensors.torch import save_file

    from preprocessing.encoders import build_encoder

    state = {f"visual.{k}": v.contiguous() for k, v in build_encoder("conch_tiny").model.state_dict().items()}
    dim = state["visual.trunk.pos_embed"].shape[-1]
    for n, why in ((1 + 4096 ** 2, "4096 x 4096"), (1 + 7, "7 positions")):
        # a grid of 16.7 million positions (stride 0: a few bytes) would be interpolated into gigabytes
        state["visual.trunk.pos_embed"] = torch.zeros(1, 1, dim).expand(1, n, dim)
        f = tmp_path / "conch.pt"
        torch.save(state, f)
        with pytest.raises(InputError, match=rf"{f}.*trunk\.pos_embed.*{why}"):
            build_encoder("conch_tiny", checkpoint=f)


# ----------------------------------------------------------------------------- training resume files


def _fresh_run() -> tuple:
    """(model, optimizer, scheduler) of a tiny run, the same every call."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


@pytest.mark.parametrize("damage", ["scalar", "nan", "not_a_dict"])
def test_resume_refuses_trainable_weights_that_do_not_fit_instead_of_broadcasting_them(tmp_path, damage):
    from slidechat import train as T
    from slidechat.train import TrainSetupError

    ckpt = T.save_checkpoint(tmp_path, 1, *_fresh_run(), {"fingerprint": "f"}, keep=0)
    weights = {k: v.clone() for k, v in read_torch_file(ckpt / "trainable.pt").items()}  # not the mapped file
    if damage == "scalar":  # copy_ would broadcast it over the whole matrix
        weights["weight"] = torch.tensor([0.5])
    elif damage == "nan":
        weights["weight"] = torch.full((2, 3), float("nan"))
    else:
        weights = [weights["weight"]]
    torch.save(weights, ckpt / "trainable.pt")
    with pytest.raises(TrainSetupError, match=rf"{ckpt / 'trainable.pt'}: .*(weight|not a dict)"):
        T.load_checkpoint(ckpt, *_fresh_run())


def test_resume_refuses_an_optimizer_file_of_another_shape(tmp_path):
    from slidechat import train as T
    from slidechat.train import TrainSetupError

    ckpt = T.save_checkpoint(tmp_path, 1, *_fresh_run(), {"fingerprint": "f"}, keep=0)
    torch.save({"optimizer": [1, 2], "scheduler": {}, "rng": {}}, ckpt / "optim.pt")
    with pytest.raises(TrainSetupError, match=rf"{ckpt / 'optim.pt'}: not the optimizer state of this run"):
        T.load_checkpoint(ckpt, *_fresh_run())


# ----------------------------------------------------------------------------- model configs


@pytest.mark.parametrize("change", [{"encoder_layers": 100_000}, {"encoder_ffn_dim": 1 << 40}, {"feature_dim": -4},
                                    {"encoder_layers": 2.5}, {"segment_lengths": list(range(1, 100_000))}])
def test_model_config_that_would_build_an_unbounded_model_is_refused_before_building(tiny_llm, tmp_path, change):
    import json

    from slidechat.checkpoint import load_model, new_model, save_model
    from slidechat.model import SlideChatConfig

    out = save_model(new_model(tiny_llm, SlideChatConfig(encoder_layers=1, encoder_ffn_dim=32, encoder_heads=4)),
                     tmp_path / "model")
    meta = json.loads((out / "slidechat_config.json").read_text())
    meta["config"].update(change)
    (out / "slidechat_config.json").write_text(json.dumps(meta))
    key = next(iter(change))
    with pytest.raises(InputError, match=rf"{out / 'slidechat_config.json'}: .*{key}"):
        load_model(out)


def test_released_state_dict_with_absurd_layer_count_is_refused_before_building(tiny_llm, tmp_path):
    from slidechat.checkpoint import load_model

    state = {f"LongNet_encoder.layers.{i}.ffn.fc1.weight": torch.zeros(1).expand(4, 8) for i in range(200)}
    state["projector.model.0.weight"] = torch.zeros(4, 8)
    torch.save({"module": state}, tmp_path / "released.pt")
    with pytest.raises(InputError, match=r"released\.pt.*encoder_layers 200"):
        load_model(tmp_path / "released.pt", llm=tiny_llm)


def test_llm_dir_missing_some_weights_is_refused_not_filled_at_random(tiny_llm, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from slidechat.checkpoint import new_model

    cut = shutil.copytree(tiny_llm, tmp_path / "cut-llm")
    weights = load_file(str(cut / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".layers.1." not in k}, str(cut / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(InputError, match=rf"{cut}: .*missing.*model\.layers\.1\."):
        new_model(cut)


def test_peft_adapter_missing_weights_is_refused_not_left_at_zero(tiny_llm, tmp_path):
    from safetensors.torch import load_file, save_file

    from slidechat.checkpoint import load_model

    out = _lora_model_dir(tiny_llm, tmp_path / "lora")
    f = out / "llm_adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if "lora_B" not in k}, str(f))
    with pytest.raises(InputError, match=rf"{f}: .*missing \(2\): .*lora_B"):
        load_model(out)


def test_a_flipped_bit_in_a_zip_checkpoint_is_detected(tmp_path):
    import struct

    f = tmp_path / "w.pt"
    torch.save({"w": torch.arange(6.0)}, f)
    raw = bytearray(f.read_bytes())
    with zipfile.ZipFile(f) as zf:
        head = zf.getinfo("w/data/0").header_offset
    name_len, extra_len = struct.unpack("<HH", raw[head + 26:head + 30])
    raw[head + 30 + name_len + extra_len + 6] ^= 0x40  # 1.0 becomes 1.5; torch itself never checks the CRC
    f.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=rf"{f}: .*w/data/0 fails its CRC check"):
        read_torch_file(f)
