"""Tests for checkpoint.py: the safetensors parser and writer (against the reference library), the restricted
unpickler for .ckpt files, one-line errors for malformed files, and downloads (resume, verification and the cache
folder) against a local HTTP server with Range support on 127.0.0.1."""

import hashlib
import http.server
import json
import os
import pickle
import re
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


# -----------------------------------------------------------------------------------------------------------------
# default weights: download with resume and verification (checkpoint.download / checkpoint.default_checkpoint)


@pytest.fixture(autouse=True)
def ldm_home(tmp_path, monkeypatch):
    """Keep the hash cache and any download inside the test's folder."""
    monkeypatch.setenv("LDM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LDM_MODEL_URL", raising=False)
    monkeypatch.delenv("LDM_MODEL_SHA256", raising=False)
    return tmp_path / "home"


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
