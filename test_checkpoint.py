"""Tests for checkpoint.py's downloads: resume, verification and the cache folder, against a local HTTP server
with Range support on 127.0.0.1."""

import hashlib
import http.server
import threading

import pytest
import torch

import checkpoint


@pytest.fixture(autouse=True)
def ldm_home(tmp_path, monkeypatch):
    """Keep the hash cache and any download inside the test's folder."""
    monkeypatch.setenv("LDM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LDM_MODEL_URL", raising=False)
    monkeypatch.delenv("LDM_MODEL_SHA256", raising=False)
    return tmp_path / "home"


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
