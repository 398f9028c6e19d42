"""Checkpoint files and model downloads: the one place that reads and writes weights on disk.

- .safetensors, parsed here (u64 header length, JSON header, raw little-endian data) and memory-mapped;
- torch zip pickles (.ckpt/.pt/.bin), read by a restricted unpickler that can build tensors and plain containers
  but never imports or runs anything named in the file;
- `load_strict`: the strict `load_state_dict` every model file goes through, with one list of keys that real files
  carry and no module holds, and one error format that names the offending keys;
- `atomic_write`: temporary file, fsync, rename, so a crash or Ctrl-C never leaves a half-written file in place;
- `download` with resume and sha256 verification, into `cache_dir()`;
- `file_sha256` / `lora_sha256`: file hashes remembered by path, size and mtime (A1111's Model hash, and its
  Lora hashes, which for a .safetensors hash the data without the header).

A leaf: it imports torch, tqdm and the standard library, and no other module of this project.
"""

import collections
import contextlib
import hashlib
import http.client
import io
import json
import math
import mmap
import os
import pickle
import pickletools
import reprlib
import stat
import struct
import sys
import typing
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

# -----------------------------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Open `path` for binary writing through `path.tmp`: on a clean exit the data is flushed, fsynced and renamed
    over `path` (and the rename made durable); on any error the temporary file is removed and an existing `path` is
    left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -----------------------------------------------------------------------------------------------------------------
# Reading: .safetensors (parsed here, memory-mapped) and .ckpt/.pt/.bin pickles (restricted unpickler).
# Every failure to read a file is a CheckpointError of one line that names the file and says what to do. The bounds
# below keep a damaged or hostile file from costing minutes, gigabytes or a hang before it is refused.

class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


MAX_HEADER_BYTES = 100_000_000  # a safetensors JSON header; the reference library's own limit
MAX_ENTRIES = 100_000  # tensors in one safetensors header: SD files hold ~1,100-2,500
MAX_DIMS = 64  # dimensions of one tensor; no weight comes near it
MAX_PICKLE_BYTES = 16 << 20  # a data.pkl: ~100 bytes per tensor, an SD .ckpt's is ~0.2 MB. Unpickling may grow
#                              each byte into a ~64-byte object, so this also bounds the memory a pickle can take.
MAX_REPEATED_BYTES = 64 << 20  # how large a view may be that repeats its storage's elements (stride 0, expand())

_DAMAGED = "the file is damaged or truncated; re-download it"
_CHECKPOINT = "pass a .safetensors or .ckpt checkpoint"


class _Unreadable(Exception):
    """Why a file cannot be read, raised inside the readers; the public functions add the file's name (_error)."""

    def __init__(self, reason: str, advice: str = _DAMAGED):
        super().__init__(reason)
        self.reason, self.advice = reason, advice


class _NotSafetensors(_Unreadable):
    """The file does not even begin like a safetensors file, so another format may fit (see _read_any)."""


def _clip(text, limit: int = 200) -> str:
    """Text that comes from the file (names, a parser's message), cut to a readable length."""
    try:
        text = str(text)
    except Exception:  # an int of more than 4300 digits cannot become text
        text = f"<a {type(text).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _repr(obj) -> str:
    """A short repr of an object from the file, which never fails."""
    try:
        return reprlib.repr(obj)
    except Exception:
        return f"<a {type(obj).__name__}>"


def _error(path, e: _Unreadable) -> CheckpointError:
    message = f"{path}: {_clip(e.reason, 400)}; {e.advice}"
    # one line whatever the file holds: newlines and other control characters from names are escaped
    return CheckpointError("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


def _check_regular(mode: int):
    if stat.S_ISDIR(mode):
        raise _Unreadable("is a folder", "pass a checkpoint file (or a diffusers folder to load_model)")
    if not stat.S_ISREG(mode):
        raise _Unreadable("not a regular file (a pipe, socket or device)", "pass a checkpoint file")


@contextlib.contextmanager
def _open_regular(path: Path):
    """`path` opened for binary reading, refused unless it is a regular file, and checked before it is opened:
    opening a FIFO blocks until some writer comes, and a device such as /dev/zero never ends. O_NONBLOCK and the
    second check cover a file swapped for a FIFO in between."""
    try:
        _check_regular(os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise _Unreadable("no such file", f"{_CHECKPOINT} path") from None
    except OSError as e:
        raise _Unreadable(f"cannot open it ({e.strerror or e})", "check the path and its permissions") from None
    with open(fd, "rb") as f:
        _check_regular(os.fstat(fd).st_mode)
        yield f


@contextlib.contextmanager
def _reading(path: Path):
    """The open file at `path`; an _Unreadable raised inside becomes the one-line CheckpointError."""
    try:
        with _open_regular(path) as f:
            yield f
    except _Unreadable as e:
        raise _error(path, e) from None


def _map(f) -> mmap.mmap:
    try:
        # ACCESS_COPY: writable private pages, so tensors may be modified in place without touching the file
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:  # ENOMEM: out of address space or over the commit limit
        raise _Unreadable(f"cannot map it into memory ({e})",
                          "free some memory or address space (ulimit -v), or copy the file to a local disk") from None


# -----------------------------------------------------------------------------------------------------------------
# safetensors: u64 little-endian header length, a JSON header, then the tensors' raw little-endian bytes

# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# dtypes the format defines that are not loaded here (torch 2.1, the oldest supported, has none of them)
UNSUPPORTED_DTYPES = ("U16", "U32", "U64", "C64", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a .safetensors file: u64 little-endian header length, JSON header, raw little-endian data.
    Tensors are memory-mapped views, so reading a 4 GB file costs no extra copy."""
    path = Path(path)
    with _reading(path) as f:
        return _read_safetensors(f)


def _read_safetensors(f) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    entries, metadata, data_start = _safetensors_header(f, os.fstat(f.fileno()).st_size)
    buf = _map(f)
    return {name: _tensor_at(buf, data_start + begin, dtype, shape)
            for name, (dtype, shape, begin, _) in entries.items()}, metadata


def _safetensors_header(f, size: int) -> tuple[dict, dict[str, str], int]:
    """({name: (dtype, shape, begin, end)}, metadata, where the data starts), after the checks the reference library
    makes: a header length within the file, a UTF-8 JSON object without duplicate keys, string metadata, and tensors
    that tile the data section exactly. Reads the header only; checking it needs none of the data."""
    if size < 8:
        raise _NotSafetensors(f"not a safetensors file ({size} bytes)")
    f.seek(0)
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > size - 8:
        raise _NotSafetensors(f"corrupt safetensors header (claims {header_len} bytes, file has {size})",
                              "the file is truncated or not safetensors; re-download it")
    if header_len > MAX_HEADER_BYTES:
        raise _NotSafetensors(f"safetensors header of {header_len} bytes, more than the {MAX_HEADER_BYTES} allowed",
                              "the file is damaged or not safetensors")
    header = _parse_header(f.read(header_len))
    metadata = _header_metadata(header.pop("__metadata__", None))
    if len(header) > MAX_ENTRIES:
        raise _too_many_entries()
    data_len = size - 8 - header_len
    entries = {name: _header_entry(name, info, data_len) for name, info in header.items()}
    _check_tiling(entries, data_len)
    return entries, metadata, 8 + header_len


def _parse_header(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")  # strictly: json.loads(bytes) would also take UTF-16 and a byte order mark
    except UnicodeDecodeError as e:
        raise _NotSafetensors(f"corrupt safetensors header (not UTF-8 at byte {e.start})") from None
    if not text.startswith("{"):  # as the format requires; rules out any other JSON value too
        raise _NotSafetensors("corrupt safetensors header (does not start with '{')")
    try:
        return json.loads(text, object_pairs_hook=_HeaderObjects(), parse_constant=_json_constant)
    except (ValueError, RecursionError) as e:
        raise _NotSafetensors(f"corrupt safetensors header ({_clip(e)})") from None


def _json_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # json.loads takes NaN and Infinity; the format's JSON does not


def _too_many_entries() -> _Unreadable:
    return _Unreadable(f"safetensors header with more than {MAX_ENTRIES} tensors",
                       "the file is damaged or not a model checkpoint")


class _HeaderObjects:
    """json object_pairs_hook for a safetensors header. It refuses duplicate keys (which of two entries, or two
    metadata values, would be meant?) and text no UTF-8 file can hold (lone surrogates from \\u escapes), and stops
    the parse as soon as the header holds more objects than MAX_ENTRIES tensors need, so that a huge header of
    tiny entries is refused in the time MAX_ENTRIES take, not minutes."""

    def __init__(self):
        self.count = 0

    def __call__(self, pairs: list) -> dict:
        self.count += 1
        if self.count > MAX_ENTRIES + 2:  # the entries, the metadata and the header itself
            raise _too_many_entries()
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen = set()
            key = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise _Unreadable(f"corrupt safetensors header (duplicate key {_clip(repr(key), 100)})")
        for text in [k for k, _ in pairs] + [v for _, v in pairs if isinstance(v, str)]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _Unreadable(f"corrupt safetensors header (invalid text {_clip(ascii(text), 100)})") from None
        return obj


def _header_metadata(metadata) -> dict[str, str]:
    if metadata is None:  # the reference library accepts "__metadata__": null
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Unreadable(f"corrupt safetensors metadata {_repr(metadata)} (it must map strings to strings)")
    return metadata


def _uints(value) -> bool:
    return isinstance(value, list) and all(type(x) is int and 0 <= x < 1 << 64 for x in value)


def _header_entry(name: str, info, data_len: int) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked on its own."""
    def corrupt(problem: str, advice: str = _DAMAGED) -> _Unreadable:
        return _Unreadable(f"corrupt safetensors entry {_clip(repr(name), 100)}: {_repr(info)} ({problem})",
                           advice)

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise corrupt("an entry needs dtype, shape and data_offsets")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if isinstance(dtype_name, str) and dtype_name in UNSUPPORTED_DTYPES:
        raise _Unreadable(f"unsupported dtype {dtype_name} (tensor {_clip(repr(name), 100)})",
                          "convert the file's tensors to one of " + ", ".join(SAFETENSORS_DTYPES))
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        raise corrupt("unknown dtype")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not _uints(shape):
        raise corrupt(f"the shape must be a list of at most {MAX_DIMS} non-negative integers")
    if not _uints(offsets) or len(offsets) != 2:
        raise corrupt("data_offsets must be two non-negative integers")
    dtype, (begin, end) = SAFETENSORS_DTYPES[dtype_name], offsets
    # torch computes strides from the sizes: they must fit an int64 even for an empty tensor
    if math.prod(max(n, 1) for n in shape) * dtype.itemsize >= 1 << 63:
        raise corrupt("the shape is too large")
    if end > data_len:
        raise corrupt(f"data section is {data_len} bytes", "the file is truncated or damaged; re-download it")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise corrupt(f"the shape needs {math.prod(shape) * dtype.itemsize} bytes, data_offsets give {end - begin}")
    return dtype, shape, begin, end


def _check_tiling(entries: dict, data_len: int):
    """The reference library's layout rule: sorted by offsets, the tensors tile the data section exactly, with no
    gap, no overlap and nothing after the last, so that no byte is read as two tensors or silently skipped."""
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != position:
            raise _Unreadable(f"corrupt safetensors entry {_clip(repr(name), 100)}: its data starts at byte {begin}, "
                              f"the tensors before it end at {position} (overlapping or shifted data_offsets)")
        position = end
    if position != data_len:
        raise _Unreadable(f"corrupt safetensors file (the data section is {data_len} bytes, its tensors cover "
                          f"{position})")


def _tensor_at(buf: mmap.mmap, offset: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor viewing `buf` at byte `offset` (zero-copy when aligned)."""
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if offset % dtype.itemsize:  # misaligned data: one copy of this tensor rather than undefined behaviour
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=numel * dtype.itemsize, offset=offset).clone()
        return raw.view(dtype).reshape(shape)
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset).reshape(shape)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] = None):
    """Write a .safetensors file atomically (atomic_write): a crash leaves any old file intact.
    Tensors are streamed one at a time, so writing never holds a second copy of the model."""
    path = Path(path)
    header, offset = {}, 0
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise CheckpointError(f"{path}: cannot store a tensor named {name!r} in safetensors; rename it")
        if t.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: cannot store tensor {name!r} of dtype {t.dtype} in safetensors (it takes "
                                  f"{', '.join(SAFETENSORS_DTYPES)}); convert the tensor first")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte aligned data section
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)


# -----------------------------------------------------------------------------------------------------------------
# torch zip pickles: <root>/data.pkl (the object), <root>/data/<key> (each storage's raw bytes, stored uncompressed)


class _Inert:
    """Stands in for training-time objects in a pickle (Lightning callback states, hyper-parameter dicts, numpy
    arrays): it accepts any construction, state and items and does nothing, so their entries load as harmless
    placeholders."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _NumpyDtype:
    """numpy.dtype as a pickle rebuilds it for a scalar: only its type code ('i8', 'f4' ...) and byte order."""

    def __init__(self, code=None, align=False, copy=True):
        self.code, self.order = code, "<"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], str):
            self.order = state[1]


_NUMPY_FORMATS = {"b1": "?", "i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "i8": "q", "u8": "Q",
                  "f2": "e", "f4": "f", "f8": "d"}


def _numpy_scalar(dtype, data=None):
    """numpy's scalar rebuilder (np.int64(5): a Lightning global_step): the plain Python number it holds, read from
    its bytes; any other numpy scalar becomes a placeholder."""
    code = dtype.code if isinstance(dtype, _NumpyDtype) and isinstance(dtype.code, str) else None
    fmt = _NUMPY_FORMATS.get(code)
    if fmt is None or not isinstance(data, bytes) or len(data) != struct.calcsize(fmt):
        return _Inert()
    return struct.unpack({"<": "<", ">": ">"}.get(dtype.order, "=") + fmt, data)[0]


def _refused(what: str) -> _Unreadable:
    return _Unreadable(f"refusing to load, the pickle asks for {_clip(what, 120)}, which could run code",
                       "only tensors and plain containers are allowed (convert it to .safetensors with a tool you "
                       "trust)")


def _latin1(text, encoding="utf-8") -> bytes:
    """_codecs.encode, as protocol-2 pickles spell a bytes value: encode(text, 'latin1'). That conversion only."""
    if isinstance(text, str) and isinstance(encoding, str) and encoding.lower() in ("latin1", "latin-1"):
        return text.encode("latin-1")
    raise _refused(f"_codecs.encode with {_repr(encoding)}")


def _bytes(*args) -> bytes:
    """builtins.bytes, which protocol-2 pickles call for b'' (never bytes(n): that would allocate n bytes)."""
    if not args or (len(args) == 1 and isinstance(args[0], (bytes, bytearray))):
        return bytes(*args)
    raise _refused(f"bytes{_repr(args)}")


def _bytearray(*args) -> bytearray:
    if not args or (len(args) == 1 and isinstance(args[0], (bytes, bytearray))):
        return bytearray(*args)
    raise _refused(f"bytearray{_repr(args)}")


def _rebuild_parameter(data, requires_grad, backward_hooks, *args):
    return data


# What a checkpoint pickle may name: tensor rebuilders (methods of the unpickler, see find_class), storage types,
# dtypes and plain containers, plus harmless stand-ins for numpy scalars and bytes.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
_TORCH_DTYPES = {name: value for name, value in vars(torch).items()
                 if isinstance(value, torch.dtype) and not name.startswith("q")}  # no quantized types
_REBUILDERS = {("torch._utils", "_rebuild_tensor"): "_tensor_v2", ("torch._utils", "_rebuild_tensor_v2"): "_tensor_v2",
               ("torch._utils", "_rebuild_tensor_v3"): "_tensor_v3"}
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    # the storage type of dtypes without a legacy one (float8, uint16 ...): bytes, viewed with the tensor's dtype
    ("torch.storage", "UntypedStorage"): torch.uint8, ("torch", "UntypedStorage"): torch.uint8,
    ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,  # state dicts carry _metadata, set by BUILD
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "bytes"): _bytes, ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): _latin1,
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar, ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **{("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): dtype for name, dtype in _TORCH_DTYPES.items()},
}
# Module prefixes whose objects real SD/LDM .ckpt files carry next to the weights (Lightning bookkeeping, numpy
# arrays). They become _Inert placeholders; nothing from them is imported or run.
_INERT_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "numpy.", "argparse.")
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol 2, torch.save's, spells them so


class _Storage(typing.NamedTuple):
    """A storage of the archive. Only persistent_load makes one (a pickle cannot name this class), and it is
    immutable, so a tensor's bytes always come from the archive member they were checked against."""
    data: torch.UntypedStorage
    dtype: torch.dtype


def _indices(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or len(values) > MAX_DIMS or \
            not all(type(n) is int and 0 <= n < 1 << 63 for n in values):
        raise _Unreadable(f"corrupt tensor in the pickle ({what} {_repr(values)})")
    return tuple(values)


def _view(storage, dtype, offset, size, stride) -> torch.Tensor:
    """The tensor `size`/`stride` at element `offset` of `storage`, checked first: it must lie inside the storage
    (else it would read other tensors' bytes or past the member), and may repeat elements (stride 0, as expand()
    makes) only up to MAX_REPEATED_BYTES, since one copy (.to(), .contiguous()) of a view of 2^60 elements would
    exhaust memory."""
    if not isinstance(storage, _Storage) or not isinstance(dtype, torch.dtype):
        raise _Unreadable("corrupt tensor in the pickle (no storage or dtype)")
    size, stride = _indices(size, "size"), _indices(stride, "stride")
    (offset,) = _indices((offset,), "storage offset")
    nbytes, numel = storage.data.nbytes(), math.prod(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else offset - 1
    if len(size) != len(stride) or (last + 1) * dtype.itemsize > nbytes or \
            numel * dtype.itemsize > max(nbytes, MAX_REPEATED_BYTES):
        raise _Unreadable(f"corrupt tensor in the pickle (size {list(size)}, stride {list(stride)} and offset "
                          f"{offset} do not fit a storage of {nbytes} bytes)")
    return torch.empty((0,), dtype=dtype).set_(storage.data, offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: "_ArchiveStorages"):
        super().__init__(file)
        self.storages, self.views = storages, []

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        if (module, name) in _REBUILDERS:
            return getattr(self, _REBUILDERS[module, name])
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        if (module + ".").startswith(_INERT_MODULES):
            return _Inert
        raise _refused(f"{module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel), numel counted in elements of the storage type
        if not (isinstance(pid, tuple) and len(pid) == 5 and isinstance(pid[0], str) and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str)):
            raise _Unreadable(f"corrupt checkpoint pickle (storage reference {_clip(_repr(pid))})")
        (numel,) = _indices((pid[4],), "storage size")
        return self.storages.get(pid[2], pid[1], numel)

    def _tensor_v2(self, storage, storage_offset, size, stride, *args):
        """torch._utils._rebuild_tensor(_v2): a view of a typed storage (requires_grad and hooks do not matter)."""
        return self._made(_view(storage, getattr(storage, "dtype", None), storage_offset, size, stride))

    def _tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *args):
        """torch._utils._rebuild_tensor_v3: an untyped storage and the dtype of its view."""
        return self._made(_view(storage, dtype, storage_offset, size, stride))

    def _made(self, t: torch.Tensor) -> torch.Tensor:
        self.views.append((t, _layout(t)))
        return t

    def load(self):
        obj = super().load()
        # BUILD on a tensor calls Tensor.__setstate__, which can re-point it at other bytes with unchecked sizes
        # (torch's legacy format); no file torch writes does that, so any tensor changed after _view is refused
        if any(_layout(t) != layout or t.requires_grad or t._backward_hooks for t, layout in self.views):
            raise _Unreadable("corrupt checkpoint pickle (a tensor is changed after it is built)")
        return obj


def _layout(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.dtype, t.storage_offset(), tuple(t.shape), t.stride()


class _ArchiveStorages:
    """The tensor data of a torch zip archive: each <root>data/<key> member, stored uncompressed, becomes a storage
    viewing the mapped file, made once per key (tensors that share a storage in the file share it here too)."""

    def __init__(self, buf: mmap.mmap, members: dict, root: str):
        self.buf, self.members, self.root, self.loaded = buf, members, root, {}

    def get(self, key: str, dtype: torch.dtype, numel: int) -> _Storage:
        if key not in self.loaded:
            self.loaded[key] = _Storage(self._bytes(key, numel * dtype.itemsize), dtype)
        return self.loaded[key]

    def _bytes(self, key: str, nbytes: int) -> torch.UntypedStorage:
        info = self.members.get(f"{self.root}data/{key}")
        if info is None or info.compress_type != zipfile.ZIP_STORED or info.file_size < nbytes:
            why = ("not in the archive" if info is None else "compressed" if info.compress_type != zipfile.ZIP_STORED
                   else f"{info.file_size} bytes, the pickle needs {nbytes}")
            raise _Unreadable(f"storage {_clip(key, 40)} is missing or damaged ({why})")
        start = self._data_start(info)
        if start + nbytes > len(self.buf):
            raise _Unreadable(f"storage {_clip(key, 40)} ends past the end of the file")
        if nbytes == 0:
            return torch.UntypedStorage(0)
        data = torch.frombuffer(self.buf, dtype=torch.uint8, count=nbytes, offset=start)
        # torch aligns members to 64 bytes; data of another writer's may need a copy to be aligned for any dtype
        return (data.clone() if start % 16 else data).untyped_storage()

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        """Where a member's bytes begin: after its local header (30 bytes, its name, an extra field), whose signature
        and name must match the central directory, or the offsets that locate the data are garbage."""
        at = info.header_offset
        head = self.buf[at:at + 30] if at >= 0 else b""
        name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        if len(head) < 30 or head[:4] != b"PK\x03\x04" or self.buf[at + 30:at + 30 + len(name)] != name:
            raise _Unreadable(f"corrupt zip archive (bad local header for {_clip(info.filename, 80)})")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        return at + 30 + name_len + extra_len


@contextlib.contextmanager
def _zip_errors():
    """zipfile reports a damaged archive with a dozen exception types (BadZipFile, EOFError, NotImplementedError for
    an unknown compression, UnicodeDecodeError for a name, zlib.error, struct.error, OSError for a bad seek ...);
    here they all mean the same."""
    try:
        yield
    except _Unreadable:
        raise
    except Exception as e:
        raise _Unreadable(f"corrupt zip archive ({type(e).__name__}: {_clip(e)})") from None


def _is_zip(f) -> bool:
    try:
        return zipfile.is_zipfile(f)
    except Exception:  # is_zipfile itself lets some errors of damaged archives through
        return False


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, refused past `limit` by its declared size, and while reading in bounded chunks, so that a
    compressed member (a deflate bomb) never unpacks beyond `limit` whatever its header says."""
    if info.file_size > limit:
        raise _Unreadable(f"{_clip(info.filename, 80)} would unpack to {info.file_size} bytes, more than the "
                          f"{limit} allowed", "the file is damaged or not a model checkpoint")
    chunks, total = [], 0
    with zf.open(info) as stream:
        while chunk := stream.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise _Unreadable(f"{_clip(info.filename, 80)} unpacks to more than {limit} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


def _check_opcodes(data: bytes):
    """Walk the pickle's opcodes before running them. The C unpickler trusts two numbers a damaged file can make
    huge: a memo index (PUT 1900000000 makes it allocate a memo table of 30 GB) and a declared length (BINBYTES
    allocates its buffer before reading it). genops checks every argument lies within the data; a memo index must
    be below the data's size, since picklers number memo entries from 0, one per PUT (a few bytes each)."""
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (type(arg) is int and 0 <= arg < len(data)):
            raise _Unreadable(f"corrupt checkpoint pickle (memo index {_clip(arg, 40)})")


def read_pickle_checkpoint(path: str | os.PathLike):
    """Read a torch zip pickle (.ckpt/.pt/.bin) without running code from it; storages are memory-mapped."""
    path = Path(path)
    with _reading(path) as f:
        return _read_torch_zip(f)


def _read_torch_zip(f):
    size = os.fstat(f.fileno()).st_size
    if not _is_zip(f):
        raise _Unreadable("not a torch zip checkpoint (legacy or corrupt pickle)",
                          "re-save it with torch >= 1.6 or convert it to .safetensors")
    with _zip_errors(), zipfile.ZipFile(f) as zf:
        members = {info.filename: info for info in zf.infolist()}
        pkl = next((n for n in members if n == "data.pkl" or n.endswith("/data.pkl")), None)
        if pkl is None:
            raise _Unreadable("zip file without data.pkl", f"not a torch checkpoint; {_CHECKPOINT}")
        root = pkl[: -len("data.pkl")]
        if root + "byteorder" in members and _read_member(zf, members[root + "byteorder"], 16) != b"little":
            raise _Unreadable("big-endian checkpoints are not supported", "convert it to .safetensors")
        # a stored data.pkl is no larger than the archive; a compressed one may not grow much beyond it
        data = _read_member(zf, members[pkl], min(MAX_PICKLE_BYTES, (1 << 20) + 16 * size))
    storages = _ArchiveStorages(_map(f), members, root)
    try:
        with warnings.catch_warnings():  # a damaged STRING opcode's escapes would warn: they are refused anyway
            warnings.simplefilter("ignore", DeprecationWarning)
            _check_opcodes(data)
            return _RestrictedUnpickler(io.BytesIO(data), storages).load()
    except _Unreadable:
        raise
    except Exception as e:  # a truncated or garbled pickle stream: any of pickle's or the rebuilders' errors
        raise _Unreadable(f"corrupt checkpoint pickle ({type(e).__name__}: {_clip(e)})") from None


# -----------------------------------------------------------------------------------------------------------------
# Reading any checkpoint


def run_file(folder: Path) -> Path | None:
    """The weights of a training run folder (train.py, train_vae.py): its final.safetensors, else its newest
    ckpt-<step>.pt; None when the folder holds neither."""
    if (Path(folder) / "final.safetensors").is_file():
        return Path(folder) / "final.safetensors"
    found = [(int(p.stem[5:]), p) for p in Path(folder).glob("ckpt-*.pt") if p.stem[5:].isdigit()]
    return max(found)[1] if found else None


def read_training_checkpoint(path: str | os.PathLike) -> dict | None:
    """The whole state a training script saved (a ckpt-<step>.pt: weights, EMA, settings...), read without running
    code; None when the file is some other pickle (a public .ckpt, a bare state dict), or no .pt file at all."""
    path = Path(path)
    if path.suffix != ".pt" or not path.is_file():  # is_file: a FIFO named x.pt is left to read_checkpoint
        return None
    with _reading(path) as f:
        obj = _read_torch_zip(f) if _is_zip(f) else None
    trained = isinstance(obj, dict) and "args" in obj and any(k in obj for k in ("unet", "lora", "autoencoder"))
    return obj if trained else None


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(flat state dict, metadata) from a .safetensors or torch pickle file; a {'state_dict': ...} wrapper is
    unwrapped and its other entries (global_step, Lightning states) are ignored. The name decides the format:
    .safetensors, or a torch zip for .ckpt/.pt/.pth/.bin; any other name is tried as both (_read_any)."""
    path = Path(path)
    with _reading(path) as f:
        if path.suffix.lower() == ".safetensors":
            return _read_safetensors(f)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            return _state_dict(_read_torch_zip(f))
        return _read_any(f)


def _read_any(f) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A file whose name does not tell its format (a download's .part, a renamed file): a full safetensors parse
    first, then a torch zip. Not two magic bytes: a safetensors header length may well begin with 'PK'."""
    try:
        return _read_safetensors(f)
    except _NotSafetensors as e:
        if not _is_zip(f):
            raise _Unreadable(f"not a safetensors file or torch zip checkpoint ({e.reason})", _CHECKPOINT) from None
    return _state_dict(_read_torch_zip(f))


def _state_dict(obj) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    metadata = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        step = obj.get("global_step")
        if isinstance(step, int) and not isinstance(step, bool):
            metadata["global_step"] = str(step)
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise _Unreadable(f"the pickle holds a {type(obj).__name__}, not a state dict", _CHECKPOINT)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    odd = [k for k in tensors if not isinstance(k, str)]
    if odd:
        raise _Unreadable(f"the state dict has a key that is not a string: {_repr(odd[0])}")
    return tensors, metadata


# -----------------------------------------------------------------------------------------------------------------
# Strict loading

# Keys real files carry that no module holds, dropped knowingly: EMA copies (model_ema.*; pruned files already hold
# the EMA weights as the main ones), training losses (loss.*: LPIPS, discriminator), the DDPM schedule buffers
# (recomputed by ldm.make_schedule), training scalars, and CLIP's position_ids (an arange).
IGNORED_PREFIXES = ("model_ema.", "loss.")
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "scale_factor",
    "denoiser.sigmas"})  # SDXL's schedule as sgm stores it (SD/SDXL-Turbo files), recomputed
IGNORED_SUFFIXES = ("embeddings.position_ids",)


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES)


def _some(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    """`module.load_state_dict(strict=True, assign=True)` after dropping the ignored keys: the file's tensors become
    the module's (no copy; build the module on the meta device). A key that is missing, unexpected or of another
    shape is a CheckpointError naming the keys: '<what> does not fit the model; missing: ...; unexpected: ...'."""
    # a training checkpoint's parts come straight from its pickle: check they are state dicts at all
    odd = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)] \
        if isinstance(state_dict, dict) else [None]
    if odd:
        raise CheckpointError(f"{what} is not a state dict of named tensors"
                              + (f" (entry {_clip(_repr(odd[0]), 80)})" if isinstance(state_dict, dict) else "")
                              + "; the file is damaged")
    sd = {k: v for k, v in state_dict.items() if not is_ignored(k)}
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or mismatched:
        problems = [f"{name}: {_some(keys)}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise CheckpointError(f"{what} does not fit the model; " + "; ".join(problems))
    module.load_state_dict(sd, strict=True, assign=True)
    return module


# -----------------------------------------------------------------------------------------------------------------
# Configs stored next to the weights (save_model's ldm_config metadata, a training checkpoint's model_config)


def json_metadata(metadata: dict, key: str, path, required: tuple = ()) -> dict:
    """metadata[key] parsed as a JSON object. A value that is missing, not a string, not JSON, not an object, or
    without one of the `required` fields is a one-line CheckpointError:
    '<path>: damaged metadata <key> (not JSON: ...); re-export the model'."""
    value = metadata.get(key) if isinstance(metadata, dict) else None
    if not isinstance(value, str):
        problem = "missing" if value is None else f"not a string: {_repr(value)}"
    else:
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError) as e:
            problem = f"not JSON: {e}"
        else:
            missing = [k for k in required if k not in parsed] if isinstance(parsed, dict) else None
            if missing is None:
                problem = f"not a JSON object: {_clip(value, 60)}"
            elif missing:
                problem = "no " + ", ".join(map(str, missing))
            else:
                return parsed
    raise _metadata_error(path, key, problem)


def read_json(path: Path) -> dict:
    """A JSON object file (a diffusers config.json), or a one-line CheckpointError naming it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a JSON file ({_clip(e)}); re-download it") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object; re-download it")
    return value


def _metadata_error(path, key: str, problem: str) -> CheckpointError:
    return _error(path, _Unreadable(f"damaged metadata {key} ({problem})", "re-export the model"))


@contextlib.contextmanager
def metadata_errors(path, key: str):
    """Around building a model (on the meta device) from a config json_metadata returned: whatever fails in there is
    the config's fault, an unknown or missing field (TypeError, KeyError), a value of the wrong type or range
    (ValueError, RuntimeError ...), so it becomes the same one-line error. A CheckpointError passes unchanged."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise _metadata_error(path, key, f"{type(e).__name__}: {_clip(e)}") from None


# -----------------------------------------------------------------------------------------------------------------
# Downloads: the default weights, fetched once into a cache folder with urllib only

DEFAULT_MODEL_URL = ("https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                     "v1-5-pruned-emaonly-fp16.safetensors")
DEFAULT_MODEL_SHA256 = "e9476a13728cd75d8279f6ec8bad753a66a1957ca375a1464dc63b37db6e3916"  # ~2.1 GB


class DownloadError(RuntimeError):
    """The default weights could not be fetched or verified; the message says what failed."""


def cache_dir() -> Path:
    """$LDM_HOME, else the platform's user cache folder + /ldm (~/.cache/ldm on Linux)."""
    if os.environ.get("LDM_HOME"):
        return Path(os.environ["LDM_HOME"]).expanduser()
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "ldm"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "ldm"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm"


def _sha256_index() -> tuple[Path, dict]:
    index_file = cache_dir() / "sha256.json"
    try:
        return index_file, json.loads(index_file.read_text())
    except (OSError, ValueError):
        return index_file, {}


def _remembered(path: Path, field: str) -> str | None:
    """The digest `field` remembered for this version (size, mtime) of `path`, or None."""
    st = path.stat()
    entry = _sha256_index()[1].get(str(path.resolve()))
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry.get(field)
    return None


def _remember_sha256(path: Path, digest: str, field: str = "sha256"):
    """Keep `digest` as `field` of path's entry (beside the other digests of the same file version)."""
    index_file, index = _sha256_index()
    st = path.stat()
    key, entry = str(path.resolve()), dict(size=st.st_size, mtime_ns=st.st_mtime_ns)
    old = index.get(key)
    if isinstance(old, dict) and all(old.get(k) == v for k, v in entry.items()):
        entry = old
    index[key] = {**entry, field: digest}
    try:  # a read-only cache only costs a re-hash next time
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_name(f"{index_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, index_file)
    except OSError:
        pass


def _hash_file(path: Path, progress: bool = False, start: int = 0) -> str:
    """sha256 hex of the bytes of `path` from offset `start` on."""
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size - start, unit="B", unit_scale=True,
                                     unit_divisor=1024, desc=f"sha256 {path.name}", disable=not progress,
                                     leave=False) as bar:
        f.seek(start)
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, progress: bool = False) -> str:
    """sha256 hex of a file, remembered in cache_dir()/sha256.json by (absolute path, size, mtime): hashing 2 GB
    takes seconds, so it is done once per file version."""
    path = Path(path)
    digest = _remembered(path, "sha256")
    if digest is None:
        digest = _hash_file(path, progress)
        _remember_sha256(path, digest)
    return digest


def lora_sha256(path: str | os.PathLike, progress: bool = False) -> str:
    """The sha256 the A1111 web UI gives a LoRA file, whose first 12 hex digits are its "Lora hashes" entry: for a
    .safetensors file, the `sshs_model_hash` sd-scripts writes into the metadata when there is one, else kohya's
    "addnet" hash, the sha256 of the data section alone (the bytes after the u64 header length and the JSON header,
    so editing the metadata leaves it as it was); for any other file (.pt, .ckpt) the sha256 of the whole file.
    Remembered in cache_dir()/sha256.json like file_sha256."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":  # by the name, as A1111 decides
        return file_sha256(path, progress)
    with _reading(path) as f:
        _, metadata, start = _safetensors_header(f, os.fstat(f.fileno()).st_size)
    written = metadata.get("sshs_model_hash", "").lower()
    if len(written) == 64 and all(c in "0123456789abcdef" for c in written):
        return written
    digest = _remembered(path, "addnet_sha256")
    if digest is None:
        digest = _hash_file(path, progress, start)
        _remember_sha256(path, digest, "addnet_sha256")
    return digest


def _fetch_into(url: str, part: Path, progress: bool, timeout: float) -> int | None:
    """Append the missing bytes of `url` to `part` (HTTP Range from its current size). Returns the full size
    the server announced (None if it did not). A server that ignores Range answers 200: start again from zero."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "ldm"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        total = e.headers.get("Content-Range", "").rpartition("/")[2]  # "bytes */SIZE": the part is complete
        return int(total) if total.isdigit() else offset
    with response:
        if response.status == 206:
            start = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")[0]
            if start != str(offset):
                raise DownloadError(f"{url}: server resumed at byte {start}, asked for {offset}")
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            total = int(total) if total.isdigit() else None
        else:  # 200: the whole file, whatever was asked
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(part, "ab" if offset else "wb") as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
                disable=not progress) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    return total


def _verify(path: Path, size: int | None, sha256: str | None, check: bool):
    """Size as announced, a readable checkpoint header (with `check`), and the pinned sha256 if there is one."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DownloadError(f"incomplete download ({actual} of {size} bytes)")
    try:
        if check:
            read_checkpoint(path)  # parses the header (and checks every tensor lies inside the file); data stays mapped
    except CheckpointError as e:
        raise DownloadError(f"downloaded file is not a valid checkpoint ({e})") from None
    if sha256:
        digest = _hash_file(path)
        if digest != sha256.lower():
            raise DownloadError(f"sha256 mismatch: got {digest}, expected {sha256.lower()}")


def download(url: str, dest: str | os.PathLike, *, sha256: str = None, progress: bool = True, attempts: int = 3,
             timeout: float = 30.0, check: bool = True) -> Path:
    """Download `url` to `dest` through `dest.part`, resuming the part file after an interruption (here, on the
    next of `attempts`, or on the next call). The part is renamed to `dest` only once verified; a file that fails
    verification is deleted. Errors are DownloadError with a one-line message."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {dest.parent}: {e.strerror or e}") from None
    for attempt in range(1, attempts + 1):
        before = part.stat().st_size if part.exists() else 0
        try:
            size = _fetch_into(url, part, progress, timeout)
            if size is None or part.stat().st_size >= size:
                break
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, cut connections
            reason = e.reason if type(e) is urllib.error.URLError else e  # e.g. "[Errno 111] Connection refused"
            got = part.stat().st_size if part.exists() else 0
            if attempt == attempts or got <= before:  # retry only a connection that was delivering bytes
                raise DownloadError(f"download of {url} failed: {reason or type(e).__name__}"
                                    + (f"; {got} bytes kept in {part}, run again to resume" if got else "")) from None
    else:
        raise DownloadError(f"download of {url} stopped early ({part.stat().st_size} of {size} bytes kept in "
                            f"{part}); run again to resume")
    try:
        _verify(part, size, sha256, check)
    except DownloadError as e:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: {e}; the partial file was deleted, run again to re-download") from None
    os.replace(part, dest)
    if sha256:  # already hashed while verifying: Model hash lookups need not read the file again
        _remember_sha256(dest, sha256.lower())
    return dest


def default_checkpoint(progress: bool = True) -> Path:
    """The default weights' path in cache_dir(), downloaded on first use. $LDM_MODEL_URL replaces the source
    (mirrors, tests); such a URL is pinned only by $LDM_MODEL_SHA256."""
    url = os.environ.get("LDM_MODEL_URL") or DEFAULT_MODEL_URL
    sha256 = os.environ.get("LDM_MODEL_SHA256") or (DEFAULT_MODEL_SHA256 if url == DEFAULT_MODEL_URL else None)
    name = url.split("?")[0].rstrip("/").rpartition("/")[2] or "model.safetensors"
    dest = cache_dir() / name
    if not dest.exists():
        print(f"downloading the default weights from {url} into {dest.parent}", file=sys.stderr)
        download(url, dest, sha256=sha256, progress=progress)
    return dest
