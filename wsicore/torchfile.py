"""Weight files as data: the one torch-file reader, the safetensors reader, and the one strict loader.

Every file a user hands us is untrusted. `read_torch_file` is the only function of the project that
unpickles (a test checks that no other product code calls `torch.load`, `pickle` or an `Unpickler`);
`read_safetensors` reads every safetensors file; `read_state_dict` gives the tensors of either kind;
`load_strict` fills every module from a state dict.

`read_torch_file` is torch's own weights-only unpickler (`torch.load(weights_only=True)`), for both torch
formats: the zip format of `torch.save` (memory-mapped) and the legacy format
(`_use_new_zipfile_serialization=False`, what older DeepSpeed wrote), whose pickles torch reads through
the same restricted unpickler. Before unpickling, the globals the file names are listed from its pickle
opcodes (pickletools: nothing is imported or run) and sorted:
  * `ALLOWED_GLOBALS`: tensors, storages, dtypes, `torch.Size`/`torch.device`, OrderedDict and a few
    builtins, a subset of torch's own weights-only defaults;
  * objects training frameworks pickle next to the weights (mmengine message hubs and history buffers,
    config dicts, the numpy arrays inside them, DeepSpeed records; modules `STUB_MODULES`): each becomes
    an inert `Stub` registered under its pickled name with `torch.serialization.safe_globals`, without
    importing its module. A stub keeps the arguments and state it was given and never calls anything;
  * anything else: the file is refused with `UnsafeFileError` naming the file and the global.
Torch's unpickler stays the enforcement: BUILD works only on instances of allowed classes (never on a
class or function, so no gadget can set attributes for the rest of the process), REDUCE only on allowed
callables, APPEND/SETITEM only on lists/dicts, and sparse tensors are checked for valid indices.
Bare pickles, TorchScript archives and torch's pre-1.6 tar format are refused, and so are pickle bombs
(a structure that expands from shared references, or nests deeper than any checkpoint: followed on the
opcode stack, never built), zip archives whose entries were compressed by re-packing or fail their CRC
check, and legacy-format files whose storages claim more bytes than the file holds.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import pickle
import pickletools
import reprlib
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from wsicore.errors import InputError, UnsafeFileError

log = logging.getLogger(__name__)

# Modules whose pickled objects are replaced by inert stubs (training-framework records, never weights).
STUB_MODULES = ("mmengine", "xtuner", "deepspeed", "numpy")

# What `torch.save` writes for tensors and plain containers (protocol 2): rebuild functions, storages,
# dtypes, sizes, devices, layouts, OrderedDict and the builtins bytes/complex/set go through. Not bytearray:
# `bytearray(N)` would fill N bytes from a few bytes of pickle, and no weight file needs it.
_TORCH_FUNCTIONS = (
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_sparse_tensor",
    "torch.serialization._get_layout",
    "torch.nn.parameter.Parameter",
    "torch.Size",
    "torch.device",
    "torch.storage.UntypedStorage",
    "collections.OrderedDict",
    "builtins.set",
    "builtins.complex",
    "_codecs.encode",
)
ALLOWED_GLOBALS = frozenset(
    _TORCH_FUNCTIONS
    + tuple(str(v) for v in vars(torch).values() if isinstance(v, torch.dtype))  # canonical names: torch.float32
    + tuple(f"torch.{n}" for n, v in vars(torch).items()  # typed storages (FloatStorage, ...), not quantized ones
            if isinstance(v, type) and issubclass(v, torch.storage.TypedStorage) and n == v.__name__
            and n.endswith("Storage") and not n.startswith("Q") and n != "TypedStorage")
)

_TORCH_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_PICKLES = 5  # magic number, protocol version, system info, the object, storage keys
# A pickle can reference one object many times (memo), so a few bytes can stand for a structure of 2**40
# elements (hashing it as a dict key never ends) or nest a million levels deep (hashing it overflows the C
# stack). Checkpoints are shallow and of about their own size; these bounds are far above any of them.
MAX_PICKLE_ELEMENTS = 1 << 26
MAX_PICKLE_DEPTH = 1000
_WEIGHT_NESTING = ("module", "state_dict", "model")  # DeepSpeed, Lightning/timm, generic trainers


# ----------------------------------------------------------------------------------------------------- stubs


class Stub:
    """Inert stand-in for a pickled object whose class is not imported: keeps what it was given, runs nothing.

    `stub_of` is the pickled name, `args` the constructor arguments (REDUCE/NEWOBJ), `state` what BUILD
    passed (for a plain object, its `__dict__`).
    """

    __slots__ = ("args", "state")
    stub_of = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Stub":
        self = object.__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # everything was kept by __new__; nothing else may run

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stub of {self.stub_of}>"

    def __reduce__(self) -> Any:  # a stub is never written back as if it were the real object
        raise TypeError(f"a stub of {self.stub_of} cannot be pickled")


@functools.cache
def stub_class(name: str) -> type[Stub]:
    """The stub class standing in for the pickled global `name` ("module.Class")."""
    return type(name.rsplit(".", 1)[-1], (Stub,), {"__slots__": (), "stub_of": name, "__module__": __name__})


# ------------------------------------------------------------------------------------------- torch files


def read_torch_file(path: str | os.PathLike, *, stubs: bool = True,
                    trusted: Mapping[str, Callable[..., Any]] | None = None) -> Any:
    """Unpickle a torch file as data: tensors and plain containers only, never code (see the module doc).

    `stubs=False` refuses training-framework objects too (our own resume files hold none). `trusted`
    maps further pickled names to the objects to build them with; only for classes whose instances are
    fresh per call (never singletons such as enum members, which BUILD could then alter).
    """
    path = Path(path)
    trusted = dict(trusted or {})
    names = _pickle_globals(path)
    stubbed = sorted(n for n in names if n not in trusted and n not in ALLOWED_GLOBALS
                     and stubs and n.split(".", 1)[0] in STUB_MODULES)
    refused = sorted(n for n in names if n not in trusted and n not in ALLOWED_GLOBALS and n not in stubbed)
    if refused:
        raise UnsafeFileError(
            f"{path}: refused: its pickle names {_listing(refused)}, which is not plain data (only tensors and "
            "plain containers are read from torch files; nothing is imported or run). Save the weights' state dict "
            "with torch.save(state_dict, file) where the file was made, or convert it to safetensors"
        )
    register = [(stub_class(n), n) for n in stubbed] + [(obj, n) for n, obj in trusted.items() if n in names]
    zip_format = _is_torch_zip(path)
    try:
        with torch.serialization.safe_globals(register):
            obj = torch.load(path, map_location="cpu" if zip_format else _legacy_storages(path), weights_only=True,
                             mmap=zip_format)
    except InputError:
        raise
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(f"{path}: refused by the weights-only unpickler: {_torch_reason(exc)}") from exc
    except Exception as exc:  # anything else is a damaged or foreign file, not a bug of ours
        raise _not_a_torch_file(path, exc) from exc
    if stubbed:
        log.info("%s: kept %d framework object type(s) as inert stubs: %s", path, len(stubbed), ", ".join(stubbed))
    return obj


def _legacy_storages(path: Path) -> Callable[[Any, str], Any]:
    """`map_location` for a legacy-format file, called with each storage torch allocates at the size the
    pickle claims, before the file's bytes are read into it: storages larger than the whole file are refused
    (the claim is a lie: a few bytes would reserve gigabytes), and each is zeroed, so a storage the file does
    not fill holds zeros, not whatever this process's memory held."""
    size = path.stat().st_size
    claimed = 0

    def check(storage: Any, location: str) -> Any:
        nonlocal claimed
        claimed += storage.nbytes()
        if claimed > size:
            raise InputError(f"{path}: its pickle claims storages of {claimed:,} bytes or more in a file of {size} "
                             "bytes (damaged or forged); not read")
        return storage.fill_(0)

    return check


def _not_a_torch_file(path: Path, exc: BaseException) -> InputError:
    return InputError(
        f"{path}: cannot be read as a torch checkpoint ({type(exc).__name__}: {_torch_reason(exc)}); expected "
        "a file written by torch.save (zip or legacy format) or a .safetensors file (a plain pickle is not read)"
    )


def _is_torch_zip(path: Path) -> bool:
    with open(path, "rb") as fh:  # torch decides by the first bytes, so we do too
        return fh.read(4) == _TORCH_ZIP_MAGIC


def _pickle_globals(path: Path) -> set[str]:
    """Every global ("module.name") the file's pickles name, read from their opcodes without running them."""
    if not path.is_file():
        raise InputError(f"{path}: not found (or not a file)")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes)")
    try:
        if not _is_torch_zip(path):  # legacy format: consecutive pickles, then raw storage bytes
            with open(path, "rb") as fh:
                return _opcode_globals(fh, _LEGACY_PICKLES, path)
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                raise UnsafeFileError(f"{path}: refused: a TorchScript archive (holds code, not only weights)")
            pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pickles) != 1 or len(set(names)) != len(names):
                raise InputError(f"{path}: a zip file, but not one written by torch.save (no single data.pkl)")
            packed = [i.filename for i in zf.infolist() if i.compress_type != zipfile.ZIP_STORED]
            if packed:  # torch.save stores; the memory-mapped read would take compressed bytes for the values
                raise InputError(
                    f"{path}: its entries are compressed ({_listing(packed, 3)}): the file was re-packed by a zip "
                    "tool. Re-pack it without compression (zip -0) or save the weights again with torch.save")
            damaged = zf.testzip()  # torch never checks the CRCs: a changed byte would load as a changed weight
            if damaged is not None:
                raise InputError(f"{path}: entry {damaged} fails its CRC check (the file changed after it was "
                                 "written: a damaged copy or disk); copy or download it again")
            return _opcode_globals(io.BytesIO(zf.read(pickles[0])), 1, path)
    except InputError:
        raise
    except Exception as exc:
        raise _not_a_torch_file(path, exc) from exc


class _Value:
    """What the opcode scan knows of one pickled value: the string it is (if any), its elements when fully
    expanded (shared references counted every time) and its nesting depth."""

    __slots__ = ("text", "elements", "depth")

    def __init__(self, text: Any = None, elements: int = 1, depth: int = 1) -> None:
        self.text, self.elements, self.depth = text, elements, depth


# opcodes that add to the container below them (it stays on the stack as the same object)
_FILLS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})


def _stack_effect(op: pickletools.OpcodeInfo) -> tuple[bool, int, str]:
    """(pops to a MARK, items popped below it or in all, what it pushes: "mark", "value" or "")."""
    before, after = op.stack_before, op.stack_after
    to_mark = pickletools.markobject in before
    below = before.index(pickletools.markobject) if to_mark else len(before)
    return to_mark, below, "mark" if after == [pickletools.markobject] else ("value" if after else "")


_EFFECTS = {op.name: _stack_effect(op) for op in pickletools.opcodes}


def _opcode_globals(fh: io.BufferedIOBase, max_pickles: int, path: Path) -> set[str]:
    """Globals named by up to `max_pickles` consecutive pickles of `fh` (GLOBAL, and STACK_GLOBAL).

    The pickle stack is followed symbolically (nothing is built): a value that would expand to more than
    `MAX_PICKLE_ELEMENTS` elements or nest deeper than `MAX_PICKLE_DEPTH` refuses the file.
    """
    found: set[str] = set()
    for _ in range(max_pickles):
        start = fh.tell()
        if not fh.read(1):
            break
        fh.seek(start)
        stack: list[_Value] = []
        marks: list[int] = []  # where each open MARK is on the stack
        memo: dict[int, _Value] = {}
        for op, arg, _pos in pickletools.genops(fh):
            name = op.name
            if name == "GLOBAL":
                module, attr = arg.split(" ", 1)
                found.add(_mapped(module, attr))
            elif name in ("INST", "OBJ", "EXT1", "EXT2", "EXT4"):  # would build objects torch.save never writes
                found.add(f"<pickle opcode {name}>")
            if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, _Value()))
                continue
            if name == "DUP":
                stack.append(stack[-1])
                continue
            to_mark, below, pushes = _EFFECTS[name]
            popped: list[_Value] = []
            if to_mark:
                mark = marks.pop()
                popped, stack[mark:] = stack[mark:], []
            if below:
                popped, stack[-below:] = stack[-below:] + popped, []
            if name == "STACK_GLOBAL":  # never written by torch.save; torch refuses it, we name it
                found.add(_mapped(*(str(v.text) if v.text is not None else "?" for v in popped)))
            if pushes == "mark":
                marks.append(len(stack))
            elif pushes:
                if not popped:  # a scalar, string or empty container
                    stack.append(_Value(arg if isinstance(arg, str) else None))
                    continue
                value, parts = (popped[0], popped[1:]) if name in _FILLS else (_Value(), popped)
                for v in parts:
                    value.elements += v.elements
                    value.depth = max(value.depth, v.depth + 1)
                if value.elements > MAX_PICKLE_ELEMENTS or value.depth > MAX_PICKLE_DEPTH:
                    raise UnsafeFileError(
                        f"{path}: refused: its pickle builds a structure "
                        + (f"nested more than {MAX_PICKLE_DEPTH} levels deep" if value.depth > MAX_PICKLE_DEPTH
                           else f"of more than {MAX_PICKLE_ELEMENTS:,} elements from references")
                        + " (a pickle bomb: reading it would hang or crash; no checkpoint is built like this)")
                stack.append(value)
    return found


def _mapped(module: str, name: str) -> str:
    """The name torch's unpickler resolves (protocol-2 pickles use Python 2 module names such as __builtin__)."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _torch_reason(exc: BaseException) -> str:
    """Torch's reason on one line, without its advice to load the file unsafely."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = " ".join(text.split())
    for advice in (" Please use `torch.serialization", " Check the documentation of torch.load"):
        text = text.split(advice, 1)[0]
    return text.strip() or type(exc).__name__


def _listing(items: list[str], limit: int = 12) -> str:
    return ", ".join(items[:limit]) + (f" ... ({len(items) - limit} more)" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------- safetensors


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a safetensors file (a format that holds nothing but tensors; checked by `load_strict`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found (or not a file)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc
    return state


# ------------------------------------------------------------------------------------------- state dicts


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The weights in a `.safetensors` or torch file, as a flat dict of tensors.

    A torch file may hold the state dict itself or nest it under `module` (DeepSpeed), `state_dict` or
    `model`; a DataParallel `module.` prefix is removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        state = _find_state_dict(read_torch_file(path), str(path))
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _is_tensor_dict(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in d.items())


def _find_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in _WEIGHT_NESTING:
            inner = obj.get(key)
            if _is_tensor_dict(inner):
                return dict(inner)
            if key == "module" and isinstance(inner, dict) and not inner:
                raise InputError(
                    f"{source}: the DeepSpeed `module` entry is empty (a ZeRO-3 checkpoint keeps its weights in the "
                    "optimizer shards); consolidate it with DeepSpeed's zero_to_fp32.py first"
                )
    top = sorted(reprlib.repr(k) for k in obj)[:20] if isinstance(obj, dict) else type(obj).__name__
    raise InputError(
        f"{source}: no state dict of tensors found (the file itself, or under {', '.join(_WEIGHT_NESTING)}); "
        f"top level: {top}"
    )


def load_strict(module: nn.Module, state: Mapping[str, Tensor], source: str,
                prefixes: tuple[str, ...] | None = None, allow_missing: Iterable[str] = ()) -> None:
    """Fill `module` from `state`: every key used, none missing, same shapes, same kind of dtype, finite values.

    `prefixes` restricts the module's keys to load (the rest of the module is left as it is);
    `allow_missing` names keys the caller fills otherwise (e.g. tied embeddings). A module built on the
    meta device is filled by assignment. Anything else raises `InputError` naming `source` and the keys.
    Only what is loaded is checked: unused entries of a file (e.g. CONCH's text tower) do not matter.
    """
    expected = module.state_dict()
    if prefixes is not None:
        expected = {k: v for k, v in expected.items() if k.startswith(prefixes)}
    skip = set(allow_missing)
    missing = sorted(k for k in expected.keys() - state.keys() if k not in skip)
    unexpected = sorted(state.keys() - expected.keys())
    common = sorted(expected.keys() & state.keys())
    bad_shape = [k for k in common if tuple(state[k].shape) != tuple(expected[k].shape)]
    bad_dtype = [k for k in common if _dtype_kind(state[k]) != _dtype_kind(expected[k])
                 or state[k].layout != torch.strided]
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(expected[k].shape)})" for k in bad_shape]
    dtypes = [f"{k} {state[k].dtype}{'' if state[k].layout == torch.strided else ' ' + str(state[k].layout)} "
              f"(model {expected[k].dtype})" for k in bad_dtype]
    # values are scanned only where shape and dtype fit the model: a tensor of another shape may be a huge
    # stride-0 view of a few bytes, which scanning would materialise
    unfit = set(bad_shape) | set(bad_dtype)
    fits = [k for k in common if k not in unfit]
    nonfinite = [k for k in fits if _dtype_kind(state[k]) in ("float", "complex")
                 and not bool(torch.isfinite(state[k]).all())]
    problems = [f"{label} ({len(keys)}): {_listing(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes),
                 ("wrong dtype", dtypes), ("NaN or infinite values", nonfinite)) if keys]
    if problems:
        raise InputError(f"{source}: these weights cannot fill the model: " + "; ".join(problems))
    assign = any(t.is_meta for t in expected.values())
    module.load_state_dict(dict(state), strict=False, assign=assign)


def _dtype_kind(t: Tensor) -> str:
    if t.is_floating_point():
        return "float"
    if t.is_complex():
        return "complex"
    return "bool" if t.dtype == torch.bool else "integer"
