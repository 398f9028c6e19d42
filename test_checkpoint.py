"""Tests for checkpoint.py: the safetensors parser and writer (against the reference library), the restricted
unpickler for .ckpt files (against torch.load), one-line errors for malformed files (hand-made, and a seeded fuzz
of small real files), configs in metadata, and downloads (resume, verification and the cache folder) against a
local HTTP server with Range support on 127.0.0.1."""

import collections
import dataclasses
import hashlib
import http.server
import io
import json
import os
import pickle
import random
import re
import shutil
import struct
import subprocess
import sys
import threading
import types
import zipfile

import pytest
import torch

import checkpoint
from testutil import FIXTURES, reference_tensors


# -----------------------------------------------------------------------------------------------------------------
# safetensors


def test_read_safetensors_written_by_reference_library():
    tensors, metadata = checkpoint.read_safetensors(FIXTURES / "ldm_reference.safetensors")
    expected = reference_tensors()
    assert metadata == {"format": "pt", "note": "x"}
    assert set(tensors) == set(expected)
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype and tensors[name].shape == t.shape, name
        assert torch.equal(tensors[name], t), name


def test_safetensors_round_trip(tmp_path):
    expected = reference_tensors()
    path = tmp_path / "x.safetensors"
    checkpoint.save_safetensors(path, expected, {"ldm_config": '{"a": 1}'})
    tensors, metadata = checkpoint.read_safetensors(path)
    assert metadata == {"ldm_config": '{"a": 1}'}
    assert set(tensors) == set(expected)
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name
    assert not list(tmp_path.glob("*.tmp"))
    # the reference library reads what we write
    import safetensors.torch as safetensors
    ref = safetensors.load_file(path)
    assert set(ref) == set(expected) and all(torch.equal(ref[k], expected[k]) for k in expected)


def test_safetensors_tensors_are_memory_mapped(tmp_path):
    path = tmp_path / "big.safetensors"
    checkpoint.save_safetensors(path, {"w": torch.ones(1024, 1024)})
    tensors, _ = checkpoint.read_safetensors(path)
    # a view of the mapping, not a private copy: writable (copy-on-write) and not owning fresh memory
    assert tensors["w"].untyped_storage().nbytes() == 4 * 1024 * 1024
    tensors["w"][0, 0] = 2.0  # copy-on-write: the file itself is untouched
    assert checkpoint.read_safetensors(path)[0]["w"][0, 0] == 1.0


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoint.save_safetensors(path, {"w": torch.ones(3)})
    before = path.read_bytes()
    # the header is written, then the second tensor cannot be read (a meta tensor has no data)
    with pytest.raises(NotImplementedError):
        checkpoint.save_safetensors(path, {"a": torch.zeros(2), "b": torch.empty(2, device="meta")})
    with pytest.raises(RuntimeError, match="disk full"):
        with checkpoint.atomic_write(path) as f:
            f.write(b"half a file")
            raise RuntimeError("disk full")
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def _write_raw(path, header: dict, data: bytes = b"", header_len=None):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)


@pytest.mark.parametrize("case, message", [
    ("tiny", "not a safetensors file (3 bytes)"),
    ("huge_header", "corrupt safetensors header (claims 1099511627776 bytes"),
    ("bad_json", "corrupt safetensors header (Expecting property name"),
    ("offsets_out_of_range", "corrupt safetensors entry 'w'.* (data section is 8 bytes)"),
    ("size_mismatch", "corrupt safetensors entry 'w': .*'shape': [2, 3]"),
    ("unknown_dtype", "corrupt safetensors entry 'w': .*'dtype': 'Q7'"),
    ("truncated", "corrupt safetensors entry 'w': .*(data section is 390 bytes); the file is truncated"),
])
def test_malformed_safetensors_is_one_line_error(tmp_path, case, message):
    path = tmp_path / "bad.safetensors"
    good = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    if case == "tiny":
        path.write_bytes(b"abc")
    elif case == "huge_header":
        _write_raw(path, good, bytes(16), header_len=1 << 40)
    elif case == "bad_json":
        path.write_bytes(struct.pack("<Q", 5) + b"{nope" + bytes(16))
    elif case == "offsets_out_of_range":
        _write_raw(path, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(8))
    elif case == "size_mismatch":
        _write_raw(path, {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, bytes(16))
    elif case == "unknown_dtype":
        _write_raw(path, {"w": {"dtype": "Q7", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16))
    elif case == "truncated":
        checkpoint.save_safetensors(path, {"w": torch.ones(100)})
        path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read_checkpoint(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: ")
    assert re.search(".*".join(re.escape(part) for part in message.split(".*")), str(e.value)), str(e.value)


def test_missing_file_and_folder_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such file"):
        checkpoint.read_checkpoint("/nonexistent/model.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="is a folder"):
        checkpoint.read_checkpoint(tmp_path)


# the reference library: a dev dependency, the oracle for what a valid file holds
safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402


def _reference_load(path) -> tuple[dict, dict] | None:
    """What the reference library loads from `path` (tensors, metadata), or None when it refuses the file."""
    try:
        tensors = safetensors_torch.load_file(path)
        with safe_open(path, "pt") as f:
            return tensors, f.metadata() or {}
    except Exception:  # SafetensorError, or torch failing on what the header describes
        return None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, strides and bytes (bytes, so that NaNs and float8 compare too)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _assert_one_line_error(path, call=None, match: str = "") -> str:
    with pytest.raises(checkpoint.CheckpointError) as e:
        (call or checkpoint.read_checkpoint)(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and message.isprintable(), message  # one line, naming the file
    assert re.search(match, message), message
    return message


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _raw_file(path, header: bytes, data: bytes = b"", header_len: int = None):
    path.write_bytes(struct.pack("<Q", len(header) if header_len is None else header_len) + header + data)


W = json.dumps({"w": _entry()}).encode()  # one F32 tensor of 2 elements: 8 bytes of data

# Files the reference library refuses: ours must refuse them too, with one line saying why.
REFUSED_BY_BOTH = {
    "header length one byte short": (lambda p: _raw_file(p, W, bytes(8), header_len=len(W) - 1), "corrupt .*header"),
    "padded header one byte short": (lambda p: _raw_file(p, W + b"  ", bytes(8), header_len=len(W) + 1),
                                     "data section is 9 bytes, its tensors cover 8"),
    "overlapping offsets": (lambda p: _raw_file(p, json.dumps({"a": _entry(), "b": _entry(offsets=(4, 12))}).encode(),
                                                bytes(12)), "'b'.*overlapping or shifted"),
    "shifted offsets": (lambda p: _raw_file(p, json.dumps({"w": _entry(offsets=(4, 12))}).encode(), bytes(12)),
                        "starts at byte 4"),
    "hole between tensors": (lambda p: _raw_file(p, json.dumps({"a": _entry(), "b": _entry(offsets=(12, 20))}).encode(),
                                                 bytes(20)), "'b'.*starts at byte 12, the tensors before it end at 8"),
    "trailing bytes": (lambda p: _raw_file(p, W, bytes(12)), "data section is 12 bytes, its tensors cover 8"),
    "duplicate keys": (lambda p: _raw_file(p, b'{"w": %s, "w": %s}' % (json.dumps(_entry()).encode(), json.dumps(
        _entry(offsets=(8, 16))).encode()), bytes(16)), "duplicate key 'w'"),
    "byte order mark": (lambda p: _raw_file(p, b"\xef\xbb\xbf" + W, bytes(8)), "does not start with '{'"),
    "UTF-16 header": (lambda p: _raw_file(p, json.dumps({"w": _entry()}).encode("utf-16"), bytes(8)), "not UTF-8"),
    "UTF-16 without BOM": (lambda p: _raw_file(p, json.dumps({"w": _entry()}).encode("utf-16-le"), bytes(8)),
                           "corrupt .*header"),
    "integer metadata value": (lambda p: _raw_file(p, json.dumps({"w": _entry(), "__metadata__": {"a": 1}}).encode(),
                                                   bytes(8)), "metadata .*must map strings to strings"),
    "metadata list": (lambda p: _raw_file(p, json.dumps({"__metadata__": ["a"]}).encode()), "metadata"),
    "lone surrogate in a name": (lambda p: _raw_file(p, b'{"\\ud800": %s}' % json.dumps(_entry()).encode(), bytes(8)),
                                 "invalid text"),
    "NaN in metadata": (lambda p: _raw_file(p, b'{"__metadata__": {"a": NaN}}'), "NaN is not JSON"),
    "NUL after the header": (lambda p: _raw_file(p, W + b"\0", bytes(8)), "Extra data"),
    "not an object": (lambda p: _raw_file(p, b"[]"), "does not start with '{'"),
    "float in shape": (lambda p: _raw_file(p, W.replace(b"[2]", b"[2.0]"), bytes(8)), "shape must be"),
    "bool in shape": (lambda p: _raw_file(p, W.replace(b"[2]", b"[true]"), bytes(4)), "shape must be"),
    "negative dimension": (lambda p: _raw_file(p, W.replace(b"[2]", b"[-2]"), bytes(8)), "shape must be"),
    "three offsets": (lambda p: _raw_file(p, W.replace(b"[0, 8]", b"[0, 8, 8]"), bytes(8)), "two non-negative"),
    "offset past 2**64": (lambda p: _raw_file(p, W.replace(b"[0, 8]", b"[0, 18446744073709551616]"), bytes(8)),
                          "two non-negative"),
    "missing data_offsets": (lambda p: _raw_file(p, b'{"w": {"dtype": "F32", "shape": [2]}}', bytes(8)),
                             "needs dtype, shape and data_offsets"),
    "entry not an object": (lambda p: _raw_file(p, b'{"w": "F32"}'), "needs dtype"),
    "lower-case dtype": (lambda p: _raw_file(p, W.replace(b"F32", b"f32"), bytes(8)), "unknown dtype"),
    "header past the file": (lambda p: _raw_file(p, W, bytes(8), header_len=len(W) + 9), "claims"),
    "only a length": (lambda p: _raw_file(p, b"", header_len=0), "corrupt safetensors header"),
}


@pytest.mark.parametrize("case", REFUSED_BY_BOTH)
def test_malformed_safetensors_refused_like_the_reference(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    write, match = REFUSED_BY_BOTH[case]
    write(path)
    assert _reference_load(path) is None, "the reference library accepts it: not a malformed case"
    _assert_one_line_error(path, match=match)
    _assert_one_line_error(path, checkpoint.read_safetensors, match=match)


# Files the reference library accepts but that are refused here, on purpose.
REFUSED_HERE = {
    # the format: "the header data MUST begin with a { character"; the reference does not check it
    "leading space": (lambda p: _raw_file(p, b" " + W, bytes(8)), "does not start with '{'"),
    "identical duplicate keys": (lambda p: _raw_file(p, b'{"w": %s, "w": %s}' % (2 * (json.dumps(_entry()).encode(),)),
                                                     bytes(8)), "duplicate key"),
    "U16": (lambda p: _raw_file(p, json.dumps({"w": _entry("U16", (4,))}).encode(), bytes(8)),
            r"unsupported dtype U16 \(tensor 'w'\); convert the file's tensors to one of F64, F32"),
    "U32": (lambda p: _raw_file(p, json.dumps({"w": _entry("U32", (2,))}).encode(), bytes(8)), "unsupported dtype U32"),
    "U64": (lambda p: _raw_file(p, json.dumps({"w": _entry("U64", (1,))}).encode(), bytes(8)), "unsupported dtype U64"),
    "C64": (lambda p: _raw_file(p, json.dumps({"w": _entry("C64", (1,))}).encode(), bytes(8)), "unsupported dtype C64"),
    "65 dimensions": (lambda p: _raw_file(p, json.dumps({"w": _entry("U8", [1] * 65, (0, 1))}).encode(), bytes(1)),
                      "at most 64"),
    "empty tensor of 2**124 elements otherwise": (
        lambda p: _raw_file(p, json.dumps({"w": _entry("F32", [0, 1 << 62, 1 << 62], (0, 0))}).encode()), "too large"),
}


@pytest.mark.parametrize("case", REFUSED_HERE)
def test_safetensors_refused_here_on_purpose(tmp_path, case):
    path = tmp_path / "odd.safetensors"
    write, match = REFUSED_HERE[case]
    write(path)
    assert _reference_load(path) is not None
    _assert_one_line_error(path, match=match)


def _valid_files(folder) -> list:
    """Valid safetensors files of every kind: the reference writer's (every supported dtype, empty tensors, a scalar,
    metadata), ours, and hand-made layouts (unsorted and misaligned offsets, empty tensors at either end, padding,
    null metadata, no tensors at all)."""
    tensors = {f"t.{name}": (torch.arange(-3, 9) * 0.7).to(dtype).reshape(3, 4)
               for name, dtype in checkpoint.SAFETENSORS_DTYPES.items()}
    tensors.update(scalar=torch.tensor(2.5), empty=torch.zeros(0, 5), empty3=torch.zeros(2, 0, 3, dtype=torch.int8))
    files = [folder / "reference.safetensors", folder / "ours.safetensors"]
    safetensors_torch.save_file(tensors, files[0], metadata={"format": "pt", "ldm_config": '{"a": [1, 2]}'})
    checkpoint.save_safetensors(files[1], tensors, {"note": "ünïcode ✓"})
    hand_made = {
        "unsorted": ({"b": _entry(offsets=(8, 16)), "a": _entry()}, bytes(range(16))),
        "misaligned": ({"a": _entry("I8", (3,), (0, 3)), "w": _entry(offsets=(3, 11))}, bytes(range(11))),
        "empty at both ends": ({"z0": _entry(shape=(0,), offsets=(0, 0)), "w": _entry(),
                                "z1": _entry(shape=(4, 0), offsets=(8, 8))}, bytes(range(8))),
        "null metadata": ({"w": _entry(), "__metadata__": None}, bytes(range(8))),
        "no tensors": ({"__metadata__": {"k": "v"}}, b""),
        "nothing": ({}, b""),
    }
    for name, (header, data) in hand_made.items():
        files.append(folder / f"{name}.safetensors")
        _raw_file(files[-1], json.dumps(header).encode() + b"   ", data)
    return files


def test_valid_safetensors_load_exactly_what_the_reference_loads(tmp_path):
    for path in _valid_files(tmp_path):
        expected, expected_metadata = _reference_load(path)
        tensors, metadata = checkpoint.read_checkpoint(path)
        assert metadata == expected_metadata, path.name
        assert set(tensors) == set(expected), path.name
        assert all(_same_tensor(tensors[k], expected[k]) for k in expected), path.name


def test_safetensors_tensors_share_one_mapping(tmp_path):
    path = tmp_path / "two.safetensors"
    checkpoint.save_safetensors(path, {"a": torch.ones(1000), "b": torch.zeros(10, 10)})
    tensors, _ = checkpoint.read_safetensors(path)
    # zero-copy: both view the same mapping of the file, 4000 bytes apart as in the file
    assert tensors["b"].data_ptr() - tensors["a"].data_ptr() == 4000


def _zero_size_entries(n: int) -> dict:
    return {f"t{i}": _entry(shape=(0,), offsets=(0, 0)) for i in range(n)}


def test_safetensors_header_bounds(tmp_path, monkeypatch):
    path = tmp_path / "many.safetensors"
    # a header of tiny entries: refused once it lists more than MAX_ENTRIES tensors, whatever their size
    _raw_file(path, json.dumps(_zero_size_entries(checkpoint.MAX_ENTRIES + 1)).encode())
    _assert_one_line_error(path, match=f"more than {checkpoint.MAX_ENTRIES} tensors")
    monkeypatch.setattr(checkpoint, "MAX_ENTRIES", 20)  # the exact edge, with and without metadata
    for metadata in ({}, {"__metadata__": {"a": "b"}}):
        _raw_file(path, json.dumps({**_zero_size_entries(20), **metadata}).encode())
        assert len(checkpoint.read_checkpoint(path)[0]) == 20
        _raw_file(path, json.dumps({**_zero_size_entries(21), **metadata}).encode())
        _assert_one_line_error(path, match="more than 20 tensors")
    # a header larger than MAX_HEADER_BYTES is refused before it is read
    monkeypatch.setattr(checkpoint, "MAX_HEADER_BYTES", 1000)
    _raw_file(path, b"{}" + b" " * 998)
    assert checkpoint.read_checkpoint(path) == ({}, {})
    _raw_file(path, b"{}" + b" " * 999)
    _assert_one_line_error(path, match="header of 1001 bytes, more than the 1000 allowed")


def _returns_soon(call):
    """call() in a thread, so that a regression that blocks (reading a FIFO) fails the test instead of hanging it."""
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_capture(call)), daemon=True)
    thread.start()
    thread.join(60)
    assert outcome, "blocked"
    return outcome[0]


def _capture(call):
    try:
        return call()
    except Exception as e:
        return e


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_and_devices_are_refused_without_blocking(tmp_path):
    for name in ("pipe.safetensors", "pipe.ckpt", "pipe.pt", "pipe"):
        os.mkfifo(tmp_path / name)
    for call, name in [(checkpoint.read_checkpoint, "pipe.safetensors"), (checkpoint.read_checkpoint, "pipe.ckpt"),
                       (checkpoint.read_checkpoint, "pipe"), (checkpoint.read_safetensors, "pipe"),
                       (checkpoint.read_pickle_checkpoint, "pipe")]:
        e = _returns_soon(lambda: call(tmp_path / name))
        assert isinstance(e, checkpoint.CheckpointError) and str(e) == (
            f"{tmp_path / name}: not a regular file (a pipe, socket or device); pass a checkpoint file")
    assert _returns_soon(lambda: checkpoint.read_training_checkpoint(tmp_path / "pipe.pt")) is None
    if os.path.exists("/dev/zero"):
        _assert_one_line_error("/dev/zero", match="not a regular file")


def test_a_failed_mapping_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    checkpoint.save_safetensors(path, {"w": torch.ones(3)})

    def no_memory(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(checkpoint.mmap, "mmap", no_memory)
    _assert_one_line_error(path, match="cannot map it into memory .*Cannot allocate memory.*; free some memory")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.uint16, torch.uint32])
def test_save_refuses_dtypes_safetensors_cannot_hold(tmp_path, dtype):
    tensor = torch.zeros(2, dtype=dtype)
    path = tmp_path / "x.safetensors"
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{re.escape(str(path))}: cannot store tensor 'b' of "
                                                         rf"dtype {dtype} in safetensors .*convert the tensor first"):
        checkpoint.save_safetensors(path, {"a": torch.ones(2), "b": tensor})
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def _header_length_starting_with_pk(path):
    """A valid safetensors file whose u64 header length begins with the bytes 'PK', as a zip file does."""
    header = json.dumps({"w": _entry(), "__metadata__": {"pad": ""}}).encode()
    length = int.from_bytes(b"PK\x00\x00\x00\x00\x00\x00", "little")  # 19280 bytes
    header = header.replace(b'"pad": ""', b'"pad": "' + b"x" * (length - len(header)) + b'"')
    _raw_file(path, header, struct.pack("<2f", 1.5, -2.0))
    assert path.read_bytes()[:2] == b"PK" and _reference_load(path) is not None


def test_format_is_decided_by_name_and_a_full_parse(tmp_path):
    for name in ("pk.safetensors", "pk.model", "pk.safetensors.part", "pk"):  # a known name, then unknown ones
        _header_length_starting_with_pk(tmp_path / name)
        tensors, metadata = checkpoint.read_checkpoint(tmp_path / name)
        assert tensors["w"].tolist() == [1.5, -2.0] and set(metadata) == {"pad"}, name
    torch.save({"w": torch.arange(3)}, tmp_path / "zip.weights")  # a torch zip under a name that does not say so
    assert checkpoint.read_checkpoint(tmp_path / "zip.weights")[0]["w"].tolist() == [0, 1, 2]
    (tmp_path / "junk.dat").write_bytes(b"neither format" * 10)
    _assert_one_line_error(tmp_path / "junk.dat", match="not a safetensors file or torch zip checkpoint "
                                                        r"\(corrupt safetensors header \(claims .*\); pass a")
    # a known name is read as that format only: a torch zip named .safetensors is not a safetensors file
    torch.save({"w": torch.arange(3)}, tmp_path / "zip.safetensors")
    _assert_one_line_error(tmp_path / "zip.safetensors", match="corrupt safetensors header")
    _header_length_starting_with_pk(tmp_path / "pk.ckpt")
    _assert_one_line_error(tmp_path / "pk.ckpt", match="not a torch zip checkpoint")


# -----------------------------------------------------------------------------------------------------------------
# pickles: weights load, training objects are neutralised, code never runs


class FakeCheckpointCallback:
    """Pickled under a Lightning module path, as real SD .ckpt files carry callback states."""

    def __init__(self):
        self.best_model_score = torch.tensor(0.5)
        self.monitor = "val/loss"


def _fake_lightning_module():
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    FakeCheckpointCallback.__module__ = mod.__name__
    FakeCheckpointCallback.__qualname__ = FakeCheckpointCallback.__name__ = "ModelCheckpoint"
    mod.ModelCheckpoint = FakeCheckpointCallback
    return mod


def test_ckpt_with_lightning_objects_loads(tmp_path, monkeypatch):
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "pytorch_lightning.callbacks.model_checkpoint", _fake_lightning_module())
    weights = {"a.weight": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64)[2:],
               "c": torch.nn.Parameter(torch.randn(2, 2)), "h": torch.randn(5).half(),
               "t": torch.randn(4, 6).t()}  # non-contiguous view
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": weights, "global_step": 840000, "epoch": 3,
                "callbacks": {"ModelCheckpoint": FakeCheckpointCallback()}}, path)
    sd, metadata = checkpoint.read_checkpoint(path)
    assert metadata == {"global_step": "840000"}
    assert set(sd) == set(weights)
    for k, v in weights.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v.detach()), k


def test_bare_state_dict_ckpt(tmp_path):
    path = tmp_path / "bare.pt"
    x = torch.randn(2, 3)
    torch.save({"x": x, "note": "not a tensor"}, path)
    sd, metadata = checkpoint.read_checkpoint(path)
    assert set(sd) == {"x"} and torch.equal(sd["x"], x) and metadata == {}


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Exploit(marker)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load.*(system|posix)"):
        checkpoint.read_checkpoint(path)
    assert not marker.exists()
    # sanity: the same file run through plain pickle would indeed have executed the payload
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert marker.exists()


def _rewrite_zip(path, edit):
    """Rewrite the torch zip at `path` member by member; edit(name, data) returns new data, or None to drop it."""
    with zipfile.ZipFile(path) as zf:
        members = [(info.filename, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                zf.writestr(name, data)


@pytest.mark.parametrize("case, message", [
    ("cut_file", "not a torch zip checkpoint"),
    ("legacy", "not a torch zip checkpoint"),
    ("garbled_pickle", "corrupt checkpoint pickle"),
    ("missing_storage", "storage 0 is missing or damaged"),
])
def test_damaged_pickles_are_one_line_errors(tmp_path, case, message):
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(10)}}, path)
    if case == "cut_file":
        path.write_bytes(path.read_bytes()[:200])
    elif case == "legacy":  # not a zip: torch < 1.6 or a hand-made pickle
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    elif case == "garbled_pickle":
        _rewrite_zip(path, lambda name, data: data[:len(data) // 2] if name.endswith("data.pkl") else data)
    elif case == "missing_storage":
        _rewrite_zip(path, lambda name, data: None if name.endswith("/data/0") else data)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read_checkpoint(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: ") and message in str(e.value)


def _same_object(ours, theirs):
    """ours (read_pickle_checkpoint) equals theirs (torch.load): tensors byte for byte with their strides, numpy
    scalars as the plain numbers they hold, containers item by item with their types and attributes."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and _same_tensor(ours, theirs.detach())
        assert ours.storage_offset() == theirs.storage_offset()
    elif type(theirs).__module__ == "numpy":
        assert type(ours) in (int, float, bool) and ours == theirs.item()
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs)
        assert getattr(ours, "__dict__", {}) == getattr(theirs, "__dict__", {})  # an OrderedDict's _metadata
        for k in theirs:
            _same_object(ours[k], theirs[k])
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            _same_object(a, b)
    else:
        assert type(ours) is type(theirs) and ours == theirs


def _storage_groups(obj: dict) -> list[set]:
    """Which tensors of a flat dict share a storage."""
    groups = collections.defaultdict(set)
    for k, t in obj.items():
        groups[t.untyped_storage().data_ptr()].add(k)
    return sorted(groups.values(), key=sorted)


def test_ckpt_loads_like_torch_load(tmp_path):
    np = pytest.importorskip("numpy")
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    sd = collections.OrderedDict(
        weight=base, rows=base[1:3], transposed=base.t(), column=base[:, 2], expanded=torch.ones(1, 3).expand(4, 3),
        empty=torch.zeros(0, 3), param=torch.nn.Parameter(torch.randn(2, 2)), scalar=torch.tensor(7))
    for dtype in (torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
                  torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16):
        sd[f"t.{dtype}"] = (torch.arange(6) % 3).to(dtype).reshape(2, 3)
    sd._metadata = collections.OrderedDict({"": {"version": 1}, "weight": {"version": 2}})
    obj = {"state_dict": sd, "global_step": np.int64(5), "lr": np.float32(0.5), "flag": np.bool_(True),
           "nested": {"a": [1, 2.5, "x", None, (True, b"raw")], "b": {"c": torch.arange(3)}},
           "bytes": b"\x00\xff", "no bytes": b"", "bytearray": bytearray(b"ab"), "set": {1, 2},
           "dtype": torch.float16, "device": torch.device("cpu"), "size": torch.Size([2, 3]), "complex": 1 + 2j}
    path = tmp_path / "model.ckpt"
    torch.save(obj, path)
    scalar = np.int64(0).__reduce__()[0]  # numpy's scalar rebuilder, wherever this numpy keeps it
    numpy_globals = [scalar, np.dtype, bytes] + [type(np.dtype(c)) for c in ("i8", "f4", "?")]
    with torch.serialization.safe_globals(numpy_globals):
        expected = torch.load(path, weights_only=True)
    ours = checkpoint.read_pickle_checkpoint(path)
    _same_object(ours, expected)
    assert _storage_groups(ours["state_dict"]) == _storage_groups(expected["state_dict"])  # views share as in torch
    assert type(ours["global_step"]) is int
    sd, metadata = checkpoint.read_checkpoint(path)
    assert metadata == {"global_step": "5"} and list(sd) == list(expected["state_dict"])


class _Ref:
    """A storage reference in a crafted pickle: ('storage', storage type, key, 'cpu', numel)."""

    def __init__(self, key="0", numel=4, storage_type=torch.FloatStorage):
        self.pid = ("storage", storage_type, key, "cpu", numel)


class _Call:
    """Pickles as func(*args), then BUILD with `state` when given."""

    def __init__(self, func, *args, state=None):
        self.reduced = (func, args) + ((state,) if state is not None else ())

    def __reduce__(self):
        return self.reduced


class _Crafter(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Ref) else None


def _tensor(ref, offset, size, stride, state=None) -> _Call:
    return _Call(torch._utils._rebuild_tensor_v2, ref, offset, size, stride, False, collections.OrderedDict(),
                 state=state)


def _torch_zip(path, obj, storages: dict = None, compression=zipfile.ZIP_STORED, pickled: bytes = None):
    """A torch zip archive by hand: data.pkl (`obj` pickled as torch.save does, or the bytes `pickled`), its
    byteorder and storage members."""
    if pickled is None:
        buf = io.BytesIO()
        _Crafter(buf, protocol=2).dump(obj)
        pickled = buf.getvalue()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickled, compress_type=compression)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
        for key, data in (storages or {"0": struct.pack("<4f", 1, 2, 3, 4)}).items():
            zf.writestr(f"archive/data/{key}", data)


@pytest.mark.parametrize("case, message", [
    ("expanded", None),  # stride 0 within bounds: a legit view (expand()), loads as torch.load loads it
    ("window", None),
    ("huge stride-0 view", r"size \[1073741824, 1073741824\], stride \[0, 0\] and offset 0 do not fit a storage of 16"),
    ("past the storage", r"size \[5\], stride \[1\] and offset 0 do not fit"),
    ("offset past the storage", r"size \[2\], stride \[1\] and offset 3 do not fit"),
    ("empty past the storage", r"size \[0\], stride \[1\] and offset 5 do not fit"),
    ("negative numel", r"corrupt tensor in the pickle \(storage size \(-1,\)\)"),
    ("storage larger than its member", r"storage 0 is missing or damaged \(16 bytes, the pickle needs 40\)"),
    ("negative offset", r"storage offset \(-1,\)"),
    ("negative stride", r"stride \(-1,\)"),
    ("sizes and strides differ", r"size \[2, 2\], stride \[1\]"),
    ("65 dimensions", r"\(size \(1, 1, 1, 1, 1, 1, ...\)\)"),
    ("float size", r"\(size \(2.0,\)\)"),
    ("bool size", r"\(size \(True,\)\)"),
    ("no storage", r"no storage or dtype"),
    ("bad storage reference", r"storage reference \('storage', 'FloatStorage'"),
    ("tensor rebuilt by BUILD", r"a tensor is changed after it is built"),
    ("requires_grad set by BUILD", r"a tensor is changed after it is built"),
    ("non-string key", r"the state dict has a key that is not a string: 3"),
])
def test_crafted_tensors_are_checked_against_their_storage(tmp_path, case, message):
    ref = _Ref()
    tensor = {
        "expanded": _tensor(ref, 1, (3, 2), (0, 1)), "window": _tensor(ref, 0, (3, 2), (1, 1)),
        "huge stride-0 view": _tensor(ref, 0, (1 << 30, 1 << 30), (0, 0)),
        "past the storage": _tensor(ref, 0, (5,), (1,)), "offset past the storage": _tensor(ref, 3, (2,), (1,)),
        "empty past the storage": _tensor(ref, 5, (0,), (1,)), "negative numel": _tensor(_Ref(numel=-1), 0, (2,), (1,)),
        "storage larger than its member": _tensor(_Ref(numel=10), 0, (2,), (1,)),
        "negative offset": _tensor(ref, -1, (2,), (1,)), "negative stride": _tensor(ref, 2, (2,), (-1,)),
        "sizes and strides differ": _tensor(ref, 0, (2, 2), (1,)),
        "65 dimensions": _tensor(ref, 0, (1,) * 65, (1,) * 65),
        "float size": _tensor(ref, 0, (2.0,), (1,)), "bool size": _tensor(ref, 0, (True,), (1,)),
        "no storage": _tensor("storage", 0, (2,), (1,)),
        "bad storage reference": _tensor(_Ref(storage_type="FloatStorage"), 0, (2,), (1,)),
        # torch's legacy Tensor.__setstate__ re-points a tensor at other bytes without any check
        "tensor rebuilt by BUILD": _tensor(ref, 0, (2,), (1,),
                                           state=(_tensor(ref, 0, (1,), (1,)), 0, (1 << 40,), (0,))),
        "requires_grad set by BUILD": _tensor(ref, 0, (2,), (1,), state=(True, None, collections.OrderedDict())),
        "non-string key": _tensor(ref, 0, (2,), (1,)),
    }[case]
    path = tmp_path / "crafted.ckpt"
    _torch_zip(path, {3 if case == "non-string key" else "w": tensor})
    if message is None:
        expected = torch.load(path, weights_only=True)["w"]
        assert _same_tensor(checkpoint.read_checkpoint(path)[0]["w"], expected)
    else:
        _assert_one_line_error(path, match=message)


def test_pickle_size_is_bounded(tmp_path, monkeypatch):
    path = tmp_path / "bomb.ckpt"
    # a deflated data.pkl that would unpack to 4 MB from an archive of a few kB: refused by its declared size
    _torch_zip(path, {"w": _tensor(_Ref(), 0, (4,), (1,)), "pad": "x" * (4 << 20)}, compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 20_000
    _assert_one_line_error(path, match=r"archive/data.pkl would unpack to \d+ bytes, more than the \d+ allowed")
    # stored, the same pickle is within the bound (16 x its size) and loads
    _torch_zip(path, {"w": _tensor(_Ref(), 0, (4,), (1,)), "pad": "x" * (4 << 20)})
    assert checkpoint.read_checkpoint(path)[0]["w"].tolist() == [1, 2, 3, 4]
    monkeypatch.setattr(checkpoint, "MAX_PICKLE_BYTES", 1 << 20)  # and never beyond MAX_PICKLE_BYTES
    _assert_one_line_error(path, match="would unpack to")


def test_compressed_storage_is_refused(tmp_path):
    path = tmp_path / "deflated.ckpt"
    torch.save({"w": torch.zeros(100)}, path)
    with zipfile.ZipFile(path) as zf:
        members = [(info.filename, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    _assert_one_line_error(path, match=r"storage 0 is missing or damaged \(compressed\)")


def _global(module, name, *args: bytes) -> bytes:
    """Protocol-2 pickle opcodes that call module.name(*args), each arg already pickled."""
    return f"c{module}\n{name}\n".encode() + b"(" + b"".join(args) + b"tR"


def _pickled(value) -> bytes:
    return pickle.dumps(value, protocol=2)[2:-1]  # without the PROTO header and the STOP


@pytest.mark.parametrize("call, message", [
    (_global("__builtin__", "eval", _pickled("1+1")), "refusing to load, the pickle asks for builtins.eval"),
    (_global("builtins", "getattr", _pickled(1), _pickled("real")), "asks for builtins.getattr"),
    (_global("torch", "load", _pickled("x")), "asks for torch.load"),
    (_global("torch.serialization", "load", _pickled("x")), "asks for torch.serialization.load"),
    (_global("posix", "system", _pickled("true")), "asks for posix.system"),
    (_global("_codecs", "encode", _pickled("x"), _pickled("zlib_codec")), "_codecs.encode with 'zlib_codec'"),
    (_global("__builtin__", "bytes", _pickled(1 << 40)), r"asks for bytes\(1099511627776,\)"),  # would be 1 TB
    (_global("__builtin__", "bytearray", _pickled(1 << 40)), r"asks for bytearray\(1099511627776,\)"),
    (_global("torch", "FloatStorage", _pickled(1 << 40)), "corrupt checkpoint pickle .*not callable"),
])
def test_pickles_that_call_anything_else_are_refused(tmp_path, call, message):
    path = tmp_path / "evil.ckpt"
    _torch_zip(path, None, pickled=b"\x80\x02" + call + b".")
    _assert_one_line_error(path, match=message)


@pytest.mark.parametrize("pickled, message", [
    # the unpickler would size its memo table by the index: 16 GB for these 9 bytes
    (b"\x80\x02Nr\xff\xff\xff\x7f.", r"corrupt checkpoint pickle \(memo index 2147483647\)"),
    (b"\x80\x02Np2147483647\n.", r"memo index 2147483647"),
    # a bytes object declared 4 GB long, allocated before it is read
    (b"\x80\x03B\xf0\xff\xff\xffabc.", r"corrupt checkpoint pickle \(ValueError: expected 4294967280 bytes"),
    (b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b"abc.", "expected 1099511627776 bytes"),
])
def test_pickle_numbers_that_would_allocate_are_refused(tmp_path, pickled, message):
    path = tmp_path / "alloc.ckpt"
    _torch_zip(path, None, pickled=pickled)
    _assert_one_line_error(path, match=message)


def test_harmless_objects_load_as_placeholders(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "extras.ckpt"
    # Lightning's hyper-parameters: a dict subclass, filled by SETITEMS
    hyper = _global("lightning.fabric.utilities.data", "AttributeDict") + b"(" + _pickled("lr") + _pickled(1) + b"u"
    pickled = b"\x80\x02}(" + _pickled("state_dict") + _pickled({}) + _pickled("arr") + _pickled(np.arange(3)) \
        + _pickled("hparams") + hyper + b"u."
    _torch_zip(path, None, pickled=pickled)
    obj = checkpoint.read_pickle_checkpoint(path)
    assert type(obj["arr"]).__name__ == "_Inert" and type(obj["hparams"]).__name__ == "_Inert"
    assert checkpoint.read_checkpoint(path) == ({}, {})


# -----------------------------------------------------------------------------------------------------------------
# Fuzzing: seeded damage to real small files; every outcome is a load or a one-line CheckpointError


def damaged_copies(blob: bytes, hot: list[range], seed: int, count: int):
    """`count` seeded damaged copies of `blob`: truncations, bit flips anywhere, and bit flips, overwritten bytes
    and changed digits within the `hot` ranges (the bytes that describe the layout: headers, directories)."""
    rng = random.Random(seed)
    for _ in range(count):
        data = bytearray(blob)
        kind = rng.randrange(5)
        where = range(len(data)) if kind == 1 else rng.choice(hot)
        if kind == 0:
            data = data[:rng.randrange(len(data))]
        elif kind in (1, 2):
            for _ in range(rng.randint(1, 3)):
                data[rng.choice(where)] ^= 1 << rng.randrange(8)
        elif kind == 3:
            at = rng.choice(where)
            data[at:at + 4] = rng.choice([bytes(4), b"\xff" * 4, rng.randbytes(4)])
        else:  # another digit, or a digit gone: shapes, offsets and lengths that still parse
            digits = [i for i in where if 48 <= data[i] <= 57]
            if digits:
                at = rng.choice(digits)
                data[at:at + 1] = rng.choice([b"", b"0", b"1", b"9", str(rng.randrange(10)).encode()])
        yield bytes(data)


def read_outcome(path):
    """read_checkpoint's result, every tensor read to its end; or None for a one-line CheckpointError naming the
    file. Any other exception fails the caller."""
    try:
        tensors, metadata = checkpoint.read_checkpoint(path)
    except checkpoint.CheckpointError as e:
        assert str(e).startswith(f"{path}: ") and str(e).isprintable(), str(e)
        return None
    for t in tensors.values():
        t.clone()
    return tensors, metadata


def _spans(blob: bytes, signature: bytes, length: int) -> list[range]:
    spans, at = [], blob.find(signature)
    while at >= 0:
        spans.append(range(at, min(at + length, len(blob))))
        at = blob.find(signature, at + 1)
    return spans


def fuzz_torch_zip(folder, seed: int, count: int) -> collections.Counter:
    """Damage a small torch.save archive: its central directory, local headers, data.pkl and data."""
    np = pytest.importorskip("numpy")
    base = folder / "base.ckpt"
    g = torch.Generator().manual_seed(seed)
    weights = collections.OrderedDict(w=torch.randn(3, 4, generator=g), b=torch.arange(5),
                                      h=torch.ones(2, dtype=torch.float16))
    weights["v"] = weights["w"][1:]
    torch.save({"state_dict": weights, "global_step": np.int64(3), "extra": {"lr": 0.1, "b": b"x"}}, base)
    blob = base.read_bytes()
    central = blob.find(b"PK\x01\x02")
    hot = [range(central, len(blob))] + _spans(blob, b"PK\x03\x04", 90) + _spans(blob, b"\x80\x02", 600)
    return _fuzz(folder, damaged_copies(blob, hot, seed, count), (".ckpt", ".pt", ""))


def fuzz_pickle_stream(folder, seed: int, count: int) -> collections.Counter:
    """Damage only data.pkl, inside an intact archive: what the unpickler and the tensor checks see."""
    base = folder / "base.ckpt"
    g = torch.Generator().manual_seed(seed)
    sd = {"w": torch.randn(3, 4, generator=g), "n": torch.arange(6).reshape(2, 3)[:, 1:], "e": torch.ones(1).expand(3)}
    torch.save({"state_dict": sd, "global_step": 7, "nested": [(1, "a"), {"k": None}]}, base)
    with zipfile.ZipFile(base) as zf:
        pkl = zf.read(next(name for name in zf.namelist() if name.endswith("/data.pkl")))
    outcomes = collections.Counter()
    for damaged in damaged_copies(pkl, [range(len(pkl))], seed, count):
        shutil.copy(base, folder / "f.ckpt")
        _rewrite_zip(folder / "f.ckpt", lambda name, data: damaged if name.endswith("data.pkl") else data)
        outcomes["loaded" if read_outcome(folder / "f.ckpt") else "refused"] += 1
    return outcomes


def _fuzz(folder, blobs, suffixes) -> collections.Counter:
    outcomes = collections.Counter()
    for i, blob in enumerate(blobs):
        path = folder / f"f{suffixes[i % len(suffixes)]}"
        path.write_bytes(blob)
        outcomes["loaded" if read_outcome(path) else "refused"] += 1
    return outcomes


def fuzz_safetensors(folder, seed: int, count: int) -> collections.Counter:
    """Damage a small safetensors file, mostly its header, and hold each outcome against the reference library:
    whatever loads here loads the same there, and whatever it refuses is refused here."""
    base = folder / "base.safetensors"
    tensors = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)),
               "i": torch.arange(6, dtype=torch.int16), "z": torch.zeros(0, 2),
               "h": torch.ones(2, 2, dtype=torch.bfloat16), "s": torch.tensor(True)}
    checkpoint.save_safetensors(base, tensors, {"ldm_config": '{"a": 1}'})
    blob = base.read_bytes()
    header_end = 8 + struct.unpack("<Q", blob[:8])[0]
    outcomes = collections.Counter()
    for i, damaged in enumerate(damaged_copies(blob, [range(0, 8), range(8, header_end)], seed, count)):
        path = folder / ("f.safetensors" if i % 2 else "f")
        path.write_bytes(damaged)
        ours, reference = read_outcome(path), _reference_load(path)
        if ours is not None:
            assert reference is not None and ours[1] == reference[1] and set(ours[0]) == set(reference[0])
            assert all(_same_tensor(ours[0][k], reference[0][k]) for k in reference[0])
        assert reference is not None or ours is None
        outcomes["loaded" if ours else "refused"] += 1
    return outcomes


@pytest.mark.parametrize("fuzz", [fuzz_torch_zip, fuzz_pickle_stream, fuzz_safetensors])
def test_fuzzed_files_load_or_fail_in_one_line(tmp_path, fuzz):
    outcomes = fuzz(tmp_path, seed=0, count=300)
    assert outcomes["loaded"] and outcomes["refused"]  # both kinds of damage were produced


# -----------------------------------------------------------------------------------------------------------------
# configs stored next to the weights


@pytest.mark.parametrize("metadata, problem", [
    ({"ldm_config": '{"unet": {}, "vae": "kl-f8"}'}, None),
    ({}, "missing"),
    ({"ldm_config": "{unet: 1"}, "not JSON: Expecting property name"),
    ({"ldm_config": "[1, 2]"}, "not a JSON object: [1, 2]"),
    ({"ldm_config": '{"vae": "kl-f8"}'}, "no unet"),
    ({"ldm_config": 5}, "not a string: 5"),
])
def test_json_metadata(tmp_path, metadata, problem):
    path = tmp_path / "m.safetensors"
    if problem is None:
        assert checkpoint.json_metadata(metadata, "ldm_config", path, required=("unet",)) == {
            "unet": {}, "vae": "kl-f8"}
        return
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.json_metadata(metadata, "ldm_config", path, required=("unet",))
    message = str(e.value)
    assert message.startswith(f"{path}: damaged metadata ldm_config ({problem}") and message.isprintable()
    assert message.endswith("); re-export the model")


def test_metadata_errors_wraps_what_building_from_a_config_raises(tmp_path):
    @dataclasses.dataclass
    class Config:
        channels: int

    path = tmp_path / "m.safetensors"
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(
            f"{path}: damaged metadata ldm_config (TypeError: ") + ".*unexpected keyword argument 'bogus'"):
        with checkpoint.metadata_errors(path, "ldm_config"):
            Config(**{"channels": 4, "bogus": 1})
    with pytest.raises(checkpoint.CheckpointError, match=r"damaged metadata ldm_config \(KeyError: 'unet'\)"):
        with checkpoint.metadata_errors(path, "ldm_config"):
            {}["unet"]
    with pytest.raises(checkpoint.CheckpointError, match="^does not fit"):  # passes a CheckpointError unchanged
        with checkpoint.metadata_errors(path, "ldm_config"):
            raise checkpoint.CheckpointError("does not fit")


def test_load_strict_refuses_what_is_not_a_state_dict():
    module = torch.nn.Linear(2, 2)
    with pytest.raises(checkpoint.CheckpointError, match=r"^x.pt \(U-Net\) is not a state dict of named tensors "
                                                         r"\(entry 3\); the file is damaged$"):
        checkpoint.load_strict(module, {3: torch.zeros(2), "bias": torch.zeros(2)}, "x.pt (U-Net)")
    with pytest.raises(checkpoint.CheckpointError, match=r"\(entry 'weight'\)"):
        checkpoint.load_strict(module, {"weight": "not a tensor", "bias": torch.zeros(2)}, "x.pt (U-Net)")
    with pytest.raises(checkpoint.CheckpointError, match="is not a state dict of named tensors; the file"):
        checkpoint.load_strict(module, ["weight"], "x.pt (U-Net)")


# -----------------------------------------------------------------------------------------------------------------
# default weights: download with resume and verification (checkpoint.download / checkpoint.default_checkpoint)


class FileServer(http.server.ThreadingHTTPServer):
    """Serves one payload at any path. mode: 'range' (honours Range), 'norange' (always 200, the whole file),
    'cut' (the first response stops halfway and closes the connection)."""

    def __init__(self, payload: bytes, mode: str = "range"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.payload, self.mode, self.ranges = payload, mode, []
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/model.safetensors"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv, data = self.server, self.server.payload
        asked = self.headers.get("Range")
        srv.ranges.append(asked)
        start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and srv.mode != "norange" else 0
        if start >= len(data) > 0 and asked:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if asked and srv.mode != "norange" else 200)
        if asked and srv.mode != "norange":
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if srv.mode == "cut" and len(srv.ranges) == 1:
            body = body[:len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("payload") / "p.safetensors"
    checkpoint.save_safetensors(path, {"w": torch.randn(300, 300, generator=torch.Generator().manual_seed(0))})
    return path.read_bytes()


@pytest.fixture
def server(request, payload):
    srv = FileServer(payload, getattr(request, "param", "range"))
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_verifies_and_renames(tmp_path, server, payload):
    sha = hashlib.sha256(payload).hexdigest()
    dest = checkpoint.download(server.url, tmp_path / "dl" / "m.safetensors", sha256=sha, progress=False)
    assert dest.read_bytes() == payload and server.ranges == [None]
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["m.safetensors"]  # no part file left


@pytest.mark.parametrize("server", ["cut"], indirect=True)
def test_download_resumes_after_a_cut(tmp_path, server, payload):
    dest, part = tmp_path / "m.safetensors", tmp_path / "m.safetensors.part"
    with pytest.raises(checkpoint.DownloadError, match="run again to resume"):
        checkpoint.download(server.url, dest, sha256=hashlib.sha256(payload).hexdigest(), progress=False, attempts=1)
    assert not dest.exists() and part.stat().st_size == len(payload) // 2
    checkpoint.download(server.url, dest, sha256=hashlib.sha256(payload).hexdigest(), progress=False, attempts=1)
    assert server.ranges == [None, f"bytes={len(payload) // 2}-"]
    assert dest.read_bytes() == payload and not part.exists()


@pytest.mark.parametrize("server", ["cut"], indirect=True)
def test_download_resumes_within_one_call(tmp_path, server, payload):
    dest = checkpoint.download(server.url, tmp_path / "m.safetensors", progress=False)
    assert dest.read_bytes() == payload and len(server.ranges) == 2


def test_complete_part_file_is_verified_and_renamed(tmp_path, server, payload):
    (tmp_path / "m.safetensors.part").write_bytes(payload)  # e.g. stopped between the last byte and the rename
    dest = checkpoint.download(server.url, tmp_path / "m.safetensors", sha256=hashlib.sha256(payload).hexdigest(),
                        progress=False)
    assert server.ranges == [f"bytes={len(payload)}-"] and dest.read_bytes() == payload  # answered 416


def test_corrupt_download_is_rejected_and_removed(tmp_path, server, payload):
    with pytest.raises(checkpoint.DownloadError, match="sha256 mismatch.*deleted"):
        checkpoint.download(server.url, tmp_path / "m.safetensors", sha256="0" * 64, progress=False)
    server.payload = payload[:100] + b"garbage"  # not a checkpoint at all, no sha pinned
    with pytest.raises(checkpoint.DownloadError, match="not a valid checkpoint"):
        checkpoint.download(server.url, tmp_path / "m.safetensors", progress=False)
    assert not list(tmp_path.glob("m.safetensors*"))  # neither the file nor its part


def test_download_of_other_files_skips_the_checkpoint_check(tmp_path, server):
    server.payload = b"a tarball, not a checkpoint" * 100
    sha = hashlib.sha256(server.payload).hexdigest()
    with pytest.raises(checkpoint.DownloadError, match="not a valid checkpoint"):
        checkpoint.download(server.url, tmp_path / "a.tgz", sha256=sha, progress=False)
    dest = checkpoint.download(server.url, tmp_path / "a.tgz", sha256=sha, progress=False, check=False)
    assert dest.read_bytes() == server.payload
    with pytest.raises(checkpoint.DownloadError, match="sha256 mismatch"):  # the pinned hash still holds
        checkpoint.download(server.url, tmp_path / "b.tgz", sha256="0" * 64, progress=False, check=False)


@pytest.mark.parametrize("server", ["norange"], indirect=True)
def test_server_without_range_restarts_from_zero(tmp_path, server, payload):
    (tmp_path / "m.safetensors.part").write_bytes(b"x" * 1000)  # a stale part that must not be kept
    dest = checkpoint.download(server.url, tmp_path / "m.safetensors", sha256=hashlib.sha256(payload).hexdigest(),
                        progress=False)
    assert server.ranges == ["bytes=1000-"] and dest.read_bytes() == payload


def test_default_checkpoint_uses_ldm_home_and_env_url(server, payload, ldm_home, monkeypatch):
    monkeypatch.setenv("LDM_MODEL_URL", server.url)
    monkeypatch.setenv("LDM_MODEL_SHA256", "f" * 64)
    with pytest.raises(checkpoint.DownloadError, match="sha256 mismatch"):
        checkpoint.default_checkpoint(progress=False)
    sha = hashlib.sha256(payload).hexdigest()
    monkeypatch.setenv("LDM_MODEL_SHA256", sha)
    path = checkpoint.default_checkpoint(progress=False)
    assert path == ldm_home / "model.safetensors" and path.read_bytes() == payload
    assert checkpoint.file_sha256(path) == sha and str(path.resolve()) in (ldm_home / "sha256.json").read_text()
    assert checkpoint.default_checkpoint(progress=False) == path and len(server.ranges) == 2  # cached: no new request


def test_lora_sha256_is_a1111s_hash_of_a_lora_file(tmp_path, ldm_home):
    """.safetensors: the sha256 of the data after the header (metadata edits keep it), or the sshs_model_hash
    sd-scripts wrote; other files: the sha256 of the whole file. Remembered beside file_sha256's digest."""
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(6.0).reshape(2, 3), "lora_unet_x.alpha": torch.tensor(2.0)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    checkpoint.save_safetensors(a, tensors)
    checkpoint.save_safetensors(b, tensors, {"ss_output_name": "b", "modelspec.title": "another header"})
    data = a.read_bytes()
    want = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    assert checkpoint.lora_sha256(a) == checkpoint.lora_sha256(b) == want != checkpoint.file_sha256(a)
    assert json.loads((ldm_home / "sha256.json").read_text())[str(a.resolve())]["addnet_sha256"] == want
    checkpoint.save_safetensors(b, tensors, {"sshs_model_hash": "AB" * 32})
    assert checkpoint.lora_sha256(b) == "ab" * 32
    torch.save(tensors, tmp_path / "c.pt")
    assert checkpoint.lora_sha256(tmp_path / "c.pt") == hashlib.sha256((tmp_path / "c.pt").read_bytes()).hexdigest()
