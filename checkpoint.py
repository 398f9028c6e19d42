"""Checkpoint files and model downloads: the one place that reads and writes weights on disk.

- .safetensors, parsed here (u64 header length, JSON header, raw little-endian data) and memory-mapped;
- torch zip pickles (.ckpt/.pt/.bin), read by a restricted unpickler that can build tensors and plain containers
  but never imports or runs anything named in the file;
- `load_strict`: the strict `load_state_dict` every model file goes through, with one list of keys that real files
  carry and no module holds, and one error format that names the offending keys;
- `atomic_write`: temporary file, fsync, rename, so a crash or Ctrl-C never leaves a half-written file in place;
- `download` with resume and sha256 verification, into `cache_dir()`.

A leaf: it imports torch, tqdm and the standard library, and no other module of this project.
"""

import collections
import contextlib
import hashlib
import http.client
import json
import math
import mmap
import os
import pickle
import struct
import sys
import urllib.error
import urllib.request
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
# Reading: .safetensors (parsed here, memory-mapped) and .ckpt/.pt/.bin pickles (restricted unpickler)

class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _map_file(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        # ACCESS_COPY: writable private pages, so tensors may be modified in place without touching the file
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _tensor_at(buf: mmap.mmap, offset: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor viewing `buf` at byte `offset` (zero-copy when aligned)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if offset % itemsize:  # misaligned data: one copy of this tensor rather than undefined behaviour
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=numel * itemsize, offset=offset).clone()
        return raw.view(dtype).reshape(shape)
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset).reshape(shape)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a .safetensors file: u64 little-endian header length, JSON header, raw little-endian data.
    Tensors are memory-mapped views, so reading a 4 GB file costs no extra copy."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes); re-download it")
    buf = _map_file(path)
    (header_len,) = struct.unpack("<Q", buf[:8])
    if header_len > size - 8 or header_len > 100_000_000:
        raise CheckpointError(f"{path}: corrupt safetensors header (claims {header_len} bytes, file has {size}); "
                              "the file is truncated or not safetensors, re-download it")
    try:
        header = json.loads(bytes(buf[8:8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); re-download it")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + header_len, size - 8 - header_len
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            ok = 0 <= begin <= end <= data_len and end - begin == nbytes and all(d >= 0 for d in shape)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors entry {name!r}: {info} "
                                  f"(data section is {data_len} bytes); the file is truncated or damaged")
        tensors[name] = _tensor_at(buf, data_start + begin, dtype, shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] = None):
    """Write a .safetensors file atomically (atomic_write): a crash leaves any old file intact.
    Tensors are streamed one at a time, so writing never holds a second copy of the model."""
    path = Path(path)
    header, offset = {}, 0
    for name, t in tensors.items():
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


class _Inert:
    """Stands in for training-time objects in a pickle (Lightning callback states, numpy scalars): it accepts any
    construction and state and does nothing, so their entries load as harmless placeholders."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _rebuild_tensor(storage, storage_offset, size, stride, *args):
    return torch.empty((0,), dtype=storage[1]).set_(storage[0], storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *args):
    return data


# What a checkpoint pickle may name: tensor rebuilders, storage types, dtypes and plain containers.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,  # state dicts carry _metadata, set by BUILD
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("torch", "Size"): torch.Size,
    **{("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()},
}
# Module prefixes whose objects real SD/LDM .ckpt files carry next to the weights (Lightning bookkeeping,
# numpy scalars for the global step). They become _Inert placeholders; nothing from them is imported or run.
_INERT_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "numpy.", "argparse")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, load_storage):
        super().__init__(file)
        self.path, self.load_storage = path, load_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8"):
            return getattr(torch, name)
        if any((module + ".").startswith(p) for p in _INERT_MODULES):
            return _Inert
        raise CheckpointError(f"{self.path}: refusing to load, the pickle asks for {module}.{name}, which could run "
                              "code; only tensors and plain containers are allowed (convert it to .safetensors with "
                              "a tool you trust)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unsupported pickle storage reference {pid!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self.path}: unsupported storage type {dtype!r}")
        return self.load_storage(str(key), dtype, int(numel)), dtype


def read_pickle_checkpoint(path: str | os.PathLike):
    """Read a torch zip pickle (.ckpt/.pt/.bin) without running code from it; storages are memory-mapped."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch zip checkpoint (legacy or corrupt pickle); re-save it with "
                              "torch >= 1.6 or convert it to .safetensors")
    buf = _map_file(path)
    with zipfile.ZipFile(path) as zf:
        members = {info.filename: info for info in zf.infolist()}
        pkl = next((n for n in members if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise CheckpointError(f"{path}: zip file without data.pkl; not a torch checkpoint")
        root = pkl[: -len("data.pkl")]
        if root + "byteorder" in members and zf.read(root + "byteorder") != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

        def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.UntypedStorage:
            info = members.get(f"{root}data/{key}")
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if info is None or info.compress_type != zipfile.ZIP_STORED or info.file_size < nbytes:
                raise CheckpointError(f"{path}: storage {key} is missing or damaged; re-download the file")
            # the member's bytes start after its local header: 30 fixed bytes + name + extra field
            name_len, extra_len = struct.unpack("<HH", buf[info.header_offset + 26: info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            if nbytes == 0:
                return torch.UntypedStorage(0)
            return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start).untyped_storage()

        with zf.open(pkl) as f:
            try:
                return _RestrictedUnpickler(f, path, load_storage).load()
            except CheckpointError:
                raise
            except Exception as e:  # truncated or garbled pickle stream
                raise CheckpointError(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {e}); "
                                      "re-download the file") from None


def run_file(folder: Path) -> Path | None:
    """The weights of a training run folder (train.py, train_vae.py): its final.safetensors, else its newest
    ckpt-<step>.pt; None when the folder holds neither."""
    if (Path(folder) / "final.safetensors").is_file():
        return Path(folder) / "final.safetensors"
    found = [(int(p.stem[5:]), p) for p in Path(folder).glob("ckpt-*.pt") if p.stem[5:].isdigit()]
    return max(found)[1] if found else None


def read_training_checkpoint(path: str | os.PathLike) -> dict | None:
    """The whole state a training script saved (a ckpt-<step>.pt: weights, EMA, settings...), read without running
    code; None when the file is some other pickle (a public .ckpt, a bare state dict)."""
    path = Path(path)
    if path.suffix != ".pt" or not zipfile.is_zipfile(path):
        return None
    obj = read_pickle_checkpoint(path)
    return obj if isinstance(obj, dict) and ("unet" in obj or "autoencoder" in obj) and "args" in obj else None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(flat state dict, metadata) from a .safetensors or torch pickle file; a {'state_dict': ...} wrapper is
    unwrapped and its other entries (global_step, Lightning states) are ignored."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; pass the path of a .safetensors or .ckpt checkpoint")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass a checkpoint file (or a diffusers folder to load_model)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK" or path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        obj = read_pickle_checkpoint(path)
        metadata = {}
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            if isinstance(obj.get("global_step"), int):
                metadata["global_step"] = str(obj["global_step"])
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, metadata
    return read_safetensors(path)


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
    "logvar", "lvlb_weights", "scale_factor"})
IGNORED_SUFFIXES = ("embeddings.position_ids",)


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES)


def _some(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    """`module.load_state_dict(strict=True, assign=True)` after dropping the ignored keys: the file's tensors become
    the module's (no copy; build the module on the meta device). A key that is missing, unexpected or of another
    shape is a CheckpointError naming the keys: '<what> does not fit the model; missing: ...; unexpected: ...'."""
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


def _remember_sha256(path: Path, digest: str):
    index_file, index = _sha256_index()
    st = path.stat()
    index[str(path.resolve())] = dict(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=digest)
    try:  # a read-only cache only costs a re-hash next time
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_name(f"{index_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, index_file)
    except OSError:
        pass


def _hash_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"sha256 {path.name}", disable=not progress, leave=False) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, progress: bool = False) -> str:
    """sha256 hex of a file, remembered in cache_dir()/sha256.json by (absolute path, size, mtime): hashing 2 GB
    takes seconds, so it is done once per file version."""
    path = Path(path)
    st = path.stat()
    entry = _sha256_index()[1].get(str(path.resolve()))
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    digest = _hash_file(path, progress)
    _remember_sha256(path, digest)
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
