"""Tests for ldm.py: checkpoint files, the schedule, sampling maths, loading and whole-pipeline parity.
CPU only, tiny presets; golden tensors come from fixtures/gen_ldm.py (reference implementations)."""

import json
import os
import pickle
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import ldm

FIXTURES = Path(__file__).resolve().parent / "fixtures"


# -----------------------------------------------------------------------------------------------------------------
# safetensors


def expected_reference_tensors():
    sys.path.insert(0, str(FIXTURES))
    from gen_ldm import reference_tensors
    return reference_tensors()


def test_read_safetensors_written_by_reference_library():
    tensors, metadata = ldm.read_safetensors(FIXTURES / "ldm_reference.safetensors")
    expected = expected_reference_tensors()
    assert metadata == {"format": "pt", "note": "x"}
    assert set(tensors) == set(expected)
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype and tensors[name].shape == t.shape, name
        assert torch.equal(tensors[name], t), name


def test_safetensors_round_trip(tmp_path):
    expected = expected_reference_tensors()
    path = tmp_path / "x.safetensors"
    ldm.save_safetensors(path, expected, {"ldm_config": '{"a": 1}'})
    tensors, metadata = ldm.read_safetensors(path)
    assert metadata == {"ldm_config": '{"a": 1}'}
    for name, t in expected.items():
        assert torch.equal(tensors[name], t), name
    assert not list(tmp_path.glob("*.tmp"))
    # the reference library reads what we write
    safetensors = pytest.importorskip("safetensors.torch")
    ref = safetensors.load_file(path)
    assert all(torch.equal(ref[k], expected[k]) for k in expected)


def test_safetensors_tensors_are_memory_mapped(tmp_path):
    path = tmp_path / "big.safetensors"
    ldm.save_safetensors(path, {"w": torch.ones(1024, 1024)})
    tensors, _ = ldm.read_safetensors(path)
    # a view of the mapping, not a private copy: writable (copy-on-write) and not owning fresh memory
    assert tensors["w"].untyped_storage().nbytes() == 4 * 1024 * 1024
    tensors["w"][0, 0] = 2.0  # copy-on-write: the file itself is untouched
    assert ldm.read_safetensors(path)[0]["w"][0, 0] == 1.0


def _write_raw(path, header: dict, data: bytes = b"", header_len=None):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)


@pytest.mark.parametrize("case", ["tiny", "huge_header", "bad_json", "offsets_out_of_range", "size_mismatch",
                                  "unknown_dtype", "truncated"])
def test_malformed_safetensors_is_one_line_error(tmp_path, case):
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
        ldm.save_safetensors(path, {"w": torch.ones(100)})
        path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ldm.CheckpointError) as e:
        ldm.read_checkpoint(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_file_error():
    with pytest.raises(ldm.CheckpointError, match="no such file"):
        ldm.read_checkpoint("/nonexistent/model.safetensors")


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
    sd, metadata = ldm.read_checkpoint(path)
    assert metadata == {"global_step": "840000"}
    assert set(sd) == set(weights)
    for k, v in weights.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v.detach()), k


def test_bare_state_dict_ckpt(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save({"x": torch.randn(2, 3)}, path)
    sd, _ = ldm.read_checkpoint(path)
    assert set(sd) == {"x"}


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Exploit(marker)}, path)
    with pytest.raises(ldm.CheckpointError, match="refusing to load.*(system|posix)"):
        ldm.read_checkpoint(path)
    assert not marker.exists()
    # sanity: the same file run through plain pickle would indeed have executed the payload
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert marker.exists()


def test_corrupt_pickle_is_one_line_error(tmp_path):
    path = tmp_path / "broken.ckpt"
    torch.save({"w": torch.zeros(10)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ldm.CheckpointError) as e:
        ldm.read_checkpoint(path)
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------------------------------------------
# schedule and DDIM grid


def test_schedule_matches_original_float64_formula():
    golden = torch.load(FIXTURES / "ldm_schedule.pt", weights_only=True)
    buffers = ldm.schedule_buffers(ldm.make_schedule())
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped"):
        torch.testing.assert_close(buffers[name], golden[name], rtol=1e-6, atol=0)
    assert abs(buffers["alphas_cumprod"][0].item() - 0.99915) < 1e-6
    assert abs(buffers["alphas_cumprod"][999].item() - 0.0046601) < 1e-6
    torch.testing.assert_close(buffers["alphas_cumprod"], golden["diffusers_alphas_cumprod"], rtol=1e-5, atol=0)
    assert set(buffers) == ldm.IGNORED_KEYS - {"logvar", "lvlb_weights", "scale_factor"}


def test_ddim_grid_matches_diffusers():
    golden = torch.load(FIXTURES / "ldm_schedule.pt", weights_only=True)
    assert list(reversed(ldm.ddim_timesteps(50))) == golden["diffusers_timesteps_50"].tolist()
    assert ldm.ddim_timesteps(50)[:3] == [1, 21, 41]
    with pytest.raises(ValueError):
        ldm.ddim_timesteps(0)
