"""What every command-line script shares (cli.py): --help and usage errors answer before torch is imported, and
errors are one line."""

import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parent
SCRIPTS = ["sample.py", "train.py", "train_vae.py", "get_emoji.py", "compare_vae.py", "bench.py"]
# Runs a script as __main__ and reports whether torch got imported on the way (a fresh interpreter each time).
PROBE = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
         "except SystemExit as e:\n    code = e.code\nprint('torch imported' if 'torch' in sys.modules else "
         "'no torch', code, file=sys.stderr)\n")


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_without_importing_torch(script):
    r = probe(script, "--help")
    assert r.stderr.strip().splitlines()[-1] == "no torch 0" and "usage:" in r.stdout and "default" in r.stdout


@pytest.mark.parametrize("script, args, expect", [
    ("sample.py", ["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    ("train.py", ["--out", "x"], "required: --data (unless --resume continues a run)"),
    ("train_vae.py", ["--data", "d", "--out", "x", "--config", "tiny"], "invalid choice: 'tiny'"),
    ("sample.py", ["a", "--cfg", "-1e30"], "a value that starts with '-' is written --flag=VALUE"),
])
def test_usage_errors_are_one_line_without_torch(script, args, expect):
    r = probe(script, *args)
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == "no torch 2" and len(lines) == 2 and lines[0].startswith("error: ") and expect in lines[0]


def test_run_maps_failures_to_one_line_and_a_status(capsys):
    def fails(error):
        def main(argv):
            raise error
        return main

    cases = [(cli.UserError("error: bad\nvalue"), 2, "error: bad value"),
             (ValueError("checkpoint damaged"), 2, "error: checkpoint damaged"),
             (OSError(28, "No space left on device", "/x/y"), 1, "error: No space left on device: /x/y"),
             (RuntimeError("CUDA out of memory. Tried 2 GiB\ndetails"), 2,
              "error: out of memory (CUDA out of memory. Tried 2 GiB); try less"),
             (KeyboardInterrupt(), 130, "stopped")]
    for error, status, line in cases:
        assert cli.run(fails(error), errors=(ValueError,), out_of_memory="try less", interrupted="stopped") == status
        assert capsys.readouterr().err.strip() == line
    with pytest.raises(RuntimeError, match="a bug"):  # anything else is a bug: its traceback is wanted
        cli.run(fails(RuntimeError("a bug")))
