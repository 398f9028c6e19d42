"""bench.py runs (never timed here): the sampling rows of the second round at the CPU's small sizes, written as JSON,
so that a GPU run of the same code is not the first."""
import json

import pytest

import bench


@pytest.mark.slow
def test_the_dpmpp_and_sdxl_rows_run_and_are_written_as_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--only", "dpmpp", "sdxl", "--json", str(out), "--workdir", str(tmp_path)])
    report = json.loads(out.read_text())
    rows = {r["measurement"]: r for r in report["rows"]}
    assert report["device"].startswith("CPU") and len(rows) == 4
    for what in ("sample tiny 64px DPM++ 2M Karras 20 steps, batch 1, eager: s/image",
                 "sample tiny-sdxl 64px Euler 30 steps, batch 1, eager: s/image"):
        assert rows[what]["ldm"] > 0 and rows[what]["diffusers"] > 0 and rows[what]["ratio"] > 0
    assert "| measurement | ldm | diffusers |" in capsys.readouterr().out


@pytest.mark.slow
def test_the_training_rows_with_lora_run(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--only", "train", "--json", str(out), "--workdir", str(tmp_path)])
    rows = {r["measurement"].split(", ", 2)[-1]: r for r in json.loads(out.read_text())["rows"]}
    lora = rows["fp32, LoRA rank 16 attn+ff, frozen base: images/s"]
    assert lora["ldm"] > 0 and lora["diffusers"] > 0
    assert rows["fp32, LoRA: images/s of full fine-tuning's"]["ldm"] > 0
