"""Data parallel training through accelerate, on the CPU: 2 processes (torchrun's launcher, which accelerate
picks up as MULTI_CPU with gloo; `accelerate launch --cpu` starts one process without MPI) of batch 1 see
the samples and draws that one process of batch 2 sees, so they compute the same losses.

Slow for its size (~40 s on 2 shared cores: two interpreters import torch and diffusers); kept to 3 steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_of_twice_the_batch(built, tiny_weights, tmp_path):
    from retarget.train.loop import train
    from retarget.train.options import TrainOptions

    run2 = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "retarget.cli", "train", "expression", str(built[0]),
           "--weights", str(tiny_weights), "-o", str(run2), "--steps", "3", "--batch-size", "1", "--lr", "1e-3",
           "--no-validate", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("trained 3 steps") == 1  # only the main process reports
    two = [json.loads(line)["loss"] for line in (run2 / "log.jsonl").read_text().splitlines()]
    one = train("expression", built[0], tmp_path / "one",
                TrainOptions(steps=3, batch_size=2, lr=1e-3, validate=False, device="cpu"),
                weights=tiny_weights, progress=False).losses
    # Same samples and draws; the gradients differ by the all-reduce's summation order and the batch shape
    # (fp32, ~1e-7 relative observed), which Adam's first steps carry into the losses.
    np.testing.assert_allclose(two, one, rtol=1e-5)
    assert two[0] == pytest.approx(one[0], rel=1e-6)
