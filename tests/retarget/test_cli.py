"""The `retarget` command: exit codes and one-line errors (weights subcommands)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from retarget.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RETARGET_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "retarget.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_tiny_then_check_exits_zero(tmp_path):
    w = tmp_path / "w"
    r = run_cli("weights", "tiny", str(w))
    assert r.returncode == 0, r.stderr
    r = run_cli("weights", "check", "--weights", str(w))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ready for `retarget run`" in r.stdout


def test_check_on_empty_folder_names_each_missing_file(tmp_path, capsys):
    from retarget.weights import RELEASE, RUN

    assert main(["weights", "check", "--weights", str(tmp_path)]) != 0
    out = capsys.readouterr().out
    for entry in RELEASE:
        if entry.needed_for == RUN:
            assert f"MISSING {entry.path}" in out


def test_check_names_the_truncated_file(tiny_weights, tmp_path, capsys):
    import shutil

    w = tmp_path / "w"
    shutil.copytree(tiny_weights, w)
    f = w / "arc2face/diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    assert main(["weights", "check", "--weights", str(w)]) != 0
    bad = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and str(f) in bad[0] and "truncated" in bad[0]


def test_env_var_is_used(tiny_weights, monkeypatch, capsys):
    monkeypatch.setenv("RETARGET_WEIGHTS", str(tiny_weights))
    assert main(["weights", "check"]) == 0
    assert str(tiny_weights) in capsys.readouterr().out


def test_retarget_error_is_one_line_without_traceback(tmp_path):
    # Writing tiny weights into a path that is a file: a clear message, no traceback.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("weights", "tiny", str(blocker / "sub"))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    assert "unexpected" not in r.stderr and str(blocker) in r.stderr


@pytest.mark.parametrize("argv", [["--help"], ["weights", "--help"], ["weights", "check", "--help"]])
def test_help_has_examples(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "examples:" in capsys.readouterr().out
