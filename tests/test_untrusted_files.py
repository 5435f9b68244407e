"""Files are data: every attack on the weight readers is built here and shown to run nothing.

Each gadget would create a marker file (or set an attribute) if any code ran; each test checks that it
did not, and that the error is one clear line naming the file. The one reader is
`wsicore.torchfile.read_torch_file`; the product paths exercised are `load_model` (our, DeepSpeed,
.pth and xtuner layouts), `slidechat convert-checkpoint`, `slidechat evaluate --model`, encoder
checkpoints (`build_encoder`, `python -m preprocessing extract --checkpoint`) and training resume.
"""

from __future__ import annotations

import ast
import collections
import io
import json
import os
import pickle
import pickletools
import random
import socket
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing.encoders import build_encoder
from slidechat.checkpoint import load_model
from slidechat.cli import main as slidechat_cli
from wsicore.errors import InputError, UnsafeFileError
from wsicore.torchfile import ALLOWED_GLOBALS, Stub, load_strict, read_state_dict, read_torch_file, stub_class

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


class Exploit:
    """Unpickled by a plain unpickler, this runs `touch marker` (the classic `__reduce__` gadget)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def released_weights() -> dict[str, torch.Tensor]:
    """A few tensors in the released key layout; the gadgets are refused before the layout matters."""
    g = torch.Generator().manual_seed(0)
    return {"LongNet_encoder.layers.0.ffn.fc1.weight": torch.randn(8, 4, generator=g),
            "projector.model.0.weight": torch.randn(6, 4, generator=g)}


def legacy_gadget(path: Path, marker: Path) -> Path:
    """A released-style DeepSpeed model file in torch's legacy format whose object pickle runs a command."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": released_weights(), "evil": Exploit(marker)}, path, _use_new_zipfile_serialization=False)
    return path


def bare_pickle_gadget(path: Path, marker: Path) -> Path:
    """A plain pickle (protocol 5, as `pickle.dump` writes) saved under a weight-file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump({"module": released_weights(), "evil": Exploit(marker)}, fh)
    return path


def zip_with_pickle(path: Path, data: bytes) -> Path:
    """A torch zip checkpoint whose `data.pkl` is `data` (hand-written opcodes)."""
    buf = io.BytesIO()
    torch.save({}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, data if info.filename.endswith("/data.pkl") else src.read(info))
    return path


def legacy_with_pickle(path: Path, data: bytes) -> Path:
    """A torch legacy-format file whose object pickle is `data` (and no storages)."""
    buf = io.BytesIO()
    torch.save({}, buf, _use_new_zipfile_serialization=False)
    buf.seek(0)
    for _ in range(3):  # magic number, protocol version, system info
        for _op in pickletools.genops(buf):
            pass
    head = buf.getvalue()[:buf.tell()]
    path.write_bytes(head + data + b"\x80\x02]q\x00.")  # then the (empty) list of storage keys
    return path


def build_gadget(module: str, name: str) -> bytes:
    """Protocol-2 pickle: GLOBAL module.name, then BUILD {'pwned': True} on that class or function itself."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x00}q\x01X\x05\x00\x00\x00pwnedq\x02\x88sb."


def one_line_error(err: str, prog: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------- code execution


def test_legacy_format_reduce_gadget_through_load_model(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "stage2_pth"
    f = legacy_gadget(folder / "mp_rank_00_model_states.pt", marker)
    for target in (folder, f):
        with pytest.raises(UnsafeFileError) as err:
            load_model(target, llm=tmp_path / "no-llm-needed")
        assert str(f) in str(err.value) and "posix.system" in str(err.value)
    assert not marker.exists()


def test_bare_pickle_saved_as_pth(tmp_path):
    marker = tmp_path / "pwned"
    f = bare_pickle_gadget(tmp_path / "model.pth", marker)
    with pytest.raises(UnsafeFileError, match=rf"{f}: refused: its pickle names posix\.system"):
        load_model(f, llm=tmp_path)
    assert not marker.exists()
    # a bare pickle of plain data runs nothing either, and is refused as not a torch file
    with open(tmp_path / "plain.pth", "wb") as fh:
        pickle.dump({"a": 1}, fh, protocol=2)
    with pytest.raises(InputError, match="a plain pickle is not read"):
        read_torch_file(tmp_path / "plain.pth")


@pytest.mark.parametrize("kind", ["legacy", "bare_pickle"])
def test_xtuner_layout_longnet_encoder_bin_gadget(tmp_path, kind):
    marker = tmp_path / "pwned"
    root = tmp_path / "xtuner"
    (root / "projector").mkdir(parents=True)
    torch.save({"model.0.weight": torch.zeros(6, 4)}, root / "projector" / "pytorch_model.bin")
    make = legacy_gadget if kind == "legacy" else bare_pickle_gadget
    f = make(root / "LongNet_encoder" / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeFileError) as err:
        load_model(root, llm=tmp_path)
    assert str(f) in str(err.value) and "posix.system" in str(err.value)
    assert not marker.exists()


def test_convert_checkpoint_cli_refuses_gadgets_and_damaged_files(tmp_path, capsys):
    marker = tmp_path / "pwned"
    good = tmp_path / "good.pt"
    torch.save({"module": released_weights()}, good)
    files = {
        "gadget": legacy_gadget(tmp_path / "gadget.pt", marker),
        "zero-byte": tmp_path / "empty.pt",
        "text": tmp_path / "notes.pt",
        "truncated": tmp_path / "truncated.pt",
        "truncated-legacy": tmp_path / "truncated-legacy.pt",
    }
    files["zero-byte"].write_bytes(b"")
    files["text"].write_text("these are not weights\n")
    files["truncated"].write_bytes(good.read_bytes()[:200])
    files["truncated-legacy"].write_bytes((tmp_path / "gadget.pt").read_bytes()[:60])
    for kind, f in files.items():
        capsys.readouterr()
        assert slidechat_cli(["convert-checkpoint", str(f), str(tmp_path / f"out-{kind}")]) == 2, kind
        line = one_line_error(capsys.readouterr().err, "slidechat convert-checkpoint")
        assert str(f) in line, line
        assert not (tmp_path / f"out-{kind}").exists()
    assert not marker.exists()
    # the real entry point, as a user runs it: exit 2, one line, nothing ran
    run = subprocess.run([sys.executable, "-m", "slidechat", "convert-checkpoint", str(files["gadget"]),
                          str(tmp_path / "out")], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert run.returncode == 2
    line = one_line_error(run.stderr, "slidechat convert-checkpoint")
    assert f"{files['gadget']}: refused: its pickle names posix.system" in line
    assert not marker.exists()


def test_evaluate_model_gadget(tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = tmp_path / "released"
    legacy_gadget(folder / "mp_rank_00_model_states.pt", marker)
    bench = tmp_path / "bench.csv"
    bench.write_text("ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer\n"
                     "1,S1,BRCA,Diagnosis,Tissue,Which?,a,b,c,d,A\n")
    (tmp_path / "features").mkdir()
    rc = slidechat_cli(["evaluate", "--benchmark", str(bench), "--features-dir", str(tmp_path / "features"),
                        "--model", str(folder), "--out-dir", str(tmp_path / "eval")])
    assert rc == 2
    line = one_line_error(capsys.readouterr().err, "slidechat evaluate")
    assert str(folder / "mp_rank_00_model_states.pt") in line and "posix.system" in line
    assert not marker.exists()


def test_encoder_checkpoint_gadget_via_extract_cli(tmp_path, cmu_small):
    from preprocessing.tiling import tile_slide

    coords = tile_slide(cmu_small, tmp_path / "tiles", target_mpp=2.0)
    marker = tmp_path / "pwned"
    for f in (legacy_gadget(tmp_path / "conch.bin", marker), bare_pickle_gadget(tmp_path / "conch.pth", marker)):
        run = subprocess.run([sys.executable, "-m", "preprocessing", "extract", "--slide", str(cmu_small),
                              "--coords", str(coords), "--encoder", "conch_tiny", "--checkpoint", str(f),
                              "--out", str(tmp_path / "features"), "--device", "cpu", "--num-workers", "0"],
                             capture_output=True, text=True, env=ENV, cwd=tmp_path)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        line = one_line_error(run.stderr.splitlines()[-1], "python -m preprocessing extract")
        assert f"{f}: refused" in line and "posix.system" in line
        assert not marker.exists()
    assert not any((tmp_path / "features").glob("*.zarr"))


@pytest.mark.parametrize("writer", [zip_with_pickle, legacy_with_pickle], ids=["zip", "legacy"])
def test_build_gadgets_on_allowed_globals_are_refused_and_change_nothing(tmp_path, writer):
    targets = [("collections", "OrderedDict", collections.OrderedDict),  # an allowed class
               ("torch._utils", "_rebuild_tensor_v2", torch._utils._rebuild_tensor_v2),  # an allowed function
               ("torch", "Size", torch.Size),
               ("mmengine.logging.message_hub", "MessageHub", stub_class("mmengine.logging.message_hub.MessageHub"))]
    for module, name, obj in targets:
        f = writer(tmp_path / f"{name}.pt", build_gadget(module, name))
        with pytest.raises(UnsafeFileError, match=rf"{f}: refused by the weights-only unpickler: Can only build"):
            read_torch_file(f)
        assert not hasattr(obj, "pwned"), f"{module}.{name} was altered"
    assert "mmengine" not in sys.modules
    # the same pickle on a fresh instance is plain data and works: the refusal is about the target
    ok = writer(tmp_path / "ok.pt", b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01}q\x02X\x01\x00\x00\x00aK\x01sb.")
    assert read_torch_file(ok).__dict__ == {"a": 1}


def test_stubs_keep_what_they_are_given_and_call_nothing(tmp_path):
    # REDUCE on a framework class with a callable argument, then BUILD: both only stored
    gadget = (b"\x80\x02cmmengine.runner\nRunner\nq\x00cmmengine.runner\nRunner\nq\x01X\x04\x00\x00\x00argsq\x02"
              b"\x86q\x03Rq\x04}q\x05X\x03\x00\x00\x00cfgq\x06X\x01\x00\x00\x00xq\x07sb.")
    obj = read_torch_file(zip_with_pickle(tmp_path / "stub.pt", gadget))
    assert isinstance(obj, Stub) and obj.stub_of == "mmengine.runner.Runner"
    assert obj.args == (stub_class("mmengine.runner.Runner"), "args") and obj.state == {"cfg": "x"}
    assert "mmengine" not in sys.modules
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(obj)
    # our own resume files hold no framework objects: there even stubs are refused
    with pytest.raises(UnsafeFileError, match="mmengine.runner.Runner"):
        read_torch_file(tmp_path / "stub.pt", stubs=False)


def test_invalid_sparse_tensor_is_refused_and_valid_one_round_trips(tmp_path):
    bad = torch.sparse_coo_tensor(torch.tensor([[0, 5], [0, 1]]), torch.tensor([1.0, 2.0]), (2, 2),
                                  check_invariants=False)  # index 5 in a dimension of size 2
    torch.save({"w": bad}, tmp_path / "bad.pt")
    with pytest.warns(UserWarning), pytest.raises(InputError, match=rf"{tmp_path / 'bad.pt'}: .*index 5"):
        read_torch_file(tmp_path / "bad.pt")
    good = torch.sparse_coo_tensor(torch.tensor([[0, 1], [0, 1]]), torch.tensor([1.0, 2.0]), (2, 2),
                                   check_invariants=True)
    torch.save({"w": good}, tmp_path / "good.pt")
    with pytest.warns(UserWarning):
        back = read_torch_file(tmp_path / "good.pt")["w"]
    torch.testing.assert_close(back.to_dense(), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    # a sparse tensor is no weight of a dense module
    with pytest.raises(InputError, match=r"wrong dtype \(1\): weight torch\.float32 torch\.sparse_coo"):
        load_strict(torch.nn.Linear(2, 2, bias=False), {"weight": good}, "sparse.pt")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_is_refused(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(UnsafeFileError, match="TorchScript"):
        read_torch_file(tmp_path / "scripted.pt")


def test_training_resume_refuses_gadgets_in_optim_and_trainable_files(tmp_path):
    from slidechat import train as T

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)

    model, opt, sched = fresh()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    ckpt = T.save_checkpoint(tmp_path, 1, model, opt, sched, {"fingerprint": "f"}, keep=0)
    draws = (torch.rand(3), random.random(), np.random.rand())
    # an honest checkpoint resumes exactly: weights, optimizer moments, schedule and RNG streams
    m2, o2, s2 = fresh()
    assert T.load_checkpoint(ckpt, m2, o2, s2)["step"] == 1
    torch.testing.assert_close(m2.weight, model.weight, atol=0, rtol=0)
    torch.testing.assert_close(o2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert s2.state_dict() == sched.state_dict()
    assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1] and np.random.rand() == draws[2]
    marker = tmp_path / "pwned"
    for name in ("optim.pt", "trainable.pt"):
        original = (ckpt / name).read_bytes()
        torch.save({"optimizer": Exploit(marker), "weight": torch.zeros(2, 3)}, ckpt / name)
        with pytest.raises(UnsafeFileError, match=rf"{ckpt / name}: refused: .*posix\.system"):
            T.load_checkpoint(ckpt, *fresh())
        (ckpt / name).write_bytes(original)
    assert not marker.exists()


DEEPSPEED_RESUME = textwrap.dedent("""
    import json, os, random, sys
    from pathlib import Path
    import torch
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    import deepspeed
    from slidechat import train as T
    from wsicore.errors import UnsafeFileError
    deepspeed.init_distributed(dist_backend="gloo")

    def engine():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}}
        return deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)[0]

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + sys.argv[3],))

    work = Path(sys.argv[1])
    eng = engine()
    for _ in range(3):
        eng.backward(eng(torch.randn(2, 4)).pow(2).sum())
        eng.step()
    tag = work / "checkpoint-00000003"
    eng.save_checkpoint(str(work), tag=tag.name, client_state={"step": 3})
    torch.save(T._rng_state(), tag / "rng_rank0.pt")
    draws = [random.random(), torch.rand(1).item()]
    weights = {k: v.clone() for k, v in eng.module.state_dict().items()}
    out = {}
    eng2 = engine()
    out["step"] = T.load_deepspeed_checkpoint(eng2, tag, 0)["step"]
    out["same_rng"] = [random.random(), torch.rand(1).item()] == draws
    out["same_weights"] = all(torch.equal(weights[k], eng2.module.state_dict()[k]) for k in weights)
    out["loss_scaler"] = type(eng2.optimizer.loss_scaler).__name__
    out["lr_step"] = eng2.lr_scheduler.last_epoch
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt", "mp_rank_00_model_states.pt"):
        original = (tag / name).read_bytes()
        torch.save({"optimizer_state_dict": Exploit(), "module": {}}, tag / name)
        try:
            T.load_deepspeed_checkpoint(engine(), tag, 0)
            out[name] = "loaded"
        except UnsafeFileError as e:
            out[name] = str(e)
        (tag / name).write_bytes(original)
    print("RESULT " + json.dumps(out))
""")


def test_deepspeed_resume_reads_every_file_as_data(tmp_path):
    pytest.importorskip("deepspeed")
    marker = tmp_path / "pwned"
    script = tmp_path / "ds_resume.py"
    script.write_text(DEEPSPEED_RESUME)
    with socket.socket() as sock:  # a free port for the one-process gloo group
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "work"), port, str(marker)],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    result = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and result, run.stdout[-3000:] + run.stderr[-3000:]
    out = json.loads(result[0][len("RESULT "):])
    assert out["step"] == 3 and out["same_rng"] and out["same_weights"] and out["lr_step"] == 3
    assert out["loss_scaler"] == "LossScaler"  # DeepSpeed's own record, rebuilt as the real class
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt", "mp_rank_00_model_states.pt"):
        assert name in out[name] and "refused" in out[name] and "posix.system" in out[name], out[name]
    assert not marker.exists()


# ------------------------------------------------------------------------------------ safetensors


def _conch_tiny_safetensors(path: Path, **changes: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    state = {f"visual.{k}": v.contiguous() for k, v in build_encoder("conch_tiny").model.state_dict().items()}
    state.update({f"visual.{k}": v for k, v in changes.items()})
    save_file(state, str(path))
    return path


def test_safetensors_with_int_dtype_or_non_finite_values_are_refused_naming_the_key(tmp_path):
    ok = _conch_tiny_safetensors(tmp_path / "ok.safetensors")
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(build_encoder("conch_tiny", checkpoint=ok)(x), build_encoder("conch_tiny")(x))
    key = "trunk.blocks.0.mlp.fc1.weight"
    w = build_encoder("conch_tiny").model.state_dict()[key]
    cases = {
        "int": (w * 100).to(torch.int32),
        "nan": w.clone().index_fill_(0, torch.tensor([3]), float("nan")),
        "inf": w.clone().index_fill_(0, torch.tensor([0]), float("inf")),
    }
    expect = {"int": r"wrong dtype \(1\): " + key.replace(".", r"\.") + r" torch\.int32",
              "nan": r"NaN or infinite values \(1\): " + key.replace(".", r"\."),
              "inf": r"NaN or infinite values \(1\): " + key.replace(".", r"\.")}
    for name, bad in cases.items():
        f = _conch_tiny_safetensors(tmp_path / f"{name}.safetensors", **{key: bad})
        with pytest.raises(InputError, match=rf"{f}: .*{expect[name]}"):
            build_encoder("conch_tiny", checkpoint=f)


# ------------------------------------------------------------------------------------ the reader itself


def test_allowed_globals_are_within_torchs_own_weights_only_defaults(tmp_path):
    """Every name we let through is one torch's weights-only unpickler accepts with nothing registered."""
    names = sorted(ALLOWED_GLOBALS)
    data = b"\x80\x02]q\x00(" + b"".join(b"c" + n.rsplit(".", 1)[0].encode() + b"\n" + n.rsplit(".", 1)[1].encode()
                                           + b"\n" for n in names) + b"e."
    loaded = torch.load(zip_with_pickle(tmp_path / "all.pt", data), weights_only=True)
    assert len(loaded) == len(names) and torch.float32 in loaded and collections.OrderedDict in loaded


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_plain_data_of_every_common_dtype_reads_back_equal(tmp_path, zip_format):
    g = torch.Generator().manual_seed(0)
    obj = {f"t_{d}": (torch.randn(3, 2, generator=g) * 10).to(d) for d in
           (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
            torch.uint8, torch.bool, torch.complex64)}
    obj["param"] = torch.nn.Parameter(torch.ones(2))
    obj["view"] = torch.arange(12.0).reshape(3, 4).t()
    obj["meta"] = collections.OrderedDict(step=3, betas=(0.9, 0.99), name="x", shape=torch.Size([2, 3]),
                                          dev=torch.device("cpu"), dtype=torch.bfloat16, tags={"a"}, raw=b"\x00\x01")
    torch.save(obj, tmp_path / "obj.pt", _use_new_zipfile_serialization=zip_format)
    back = read_torch_file(tmp_path / "obj.pt")
    assert back.keys() == obj.keys() and back["meta"] == obj["meta"]
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert isinstance(back["param"], torch.nn.Parameter)
    with pytest.raises(InputError, match="no state dict of tensors found"):  # "meta" is no tensor
        read_state_dict(tmp_path / "obj.pt")


# --------------------------------------------------------------------- the reader is the only one


FORBIDDEN_CALLS = {"torch.load", "torch.serialization.load", "torch.jit.load", "pickle.load", "pickle.loads",
                   "pd.read_pickle", "pandas.read_pickle"}
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unpickling_sites(source: str) -> list[str]:
    """Where a module's source unpickles (calls, imports and Unpickler uses), as 'line: what'."""
    sites = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            sites += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            sites.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and ast.unparse(node) in FORBIDDEN_CALLS:
            sites.append(f"{node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Attribute) and node.attr == "Unpickler") or (
                isinstance(node, ast.Name) and node.id == "Unpickler"):
            sites.append(f"{node.lineno}: Unpickler")
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("np.load") and any(
                k.arg == "allow_pickle" for k in node.keywords):
            sites.append(f"{node.lineno}: np.load(allow_pickle=...)")
    return sorted(sites, key=lambda site: int(site.split(":")[0]))


def test_no_product_code_unpickles_outside_the_one_reader():
    assert unpickling_sites("import torch\nx = torch.load('f')\nfrom pickle import loads\n") == [
        "2: torch.load", "3: from pickle import ..."]  # the check itself can fail
    found = {}
    for pkg in ("wsicore", "preprocessing", "slidechat"):
        for f in sorted((REPO / pkg).rglob("*.py")):
            if f == REPO / "wsicore" / "torchfile.py":
                continue
            sites = unpickling_sites(f.read_text())
            if sites:
                found[str(f.relative_to(REPO))] = sites
    assert found == {}, f"unpickling outside wsicore/torchfile.py: {found}"
