"""The versions CI's second pass installs (.ci/floor-versions.txt) are pyproject's floors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_floor_pass_installs_the_declared_floors():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d).groups() for d in deps if ">=" in d)
    pins = dict(line.split("==") for line in (REPO / ".ci" / "floor-versions.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert set(pins) == {"torch", "torchvision", "diffusers", "transformers", "peft"}
    for name, version in pins.items():
        # "2.13" allows 2.13.0: compare as padded tuples
        want = tuple(int(x) for x in floors[name].split(".")) + (0,) * 3
        got = tuple(int(x) for x in version.split(".")) + (0,) * 3
        assert want[:3] == got[:3], (name, floors[name], version)
    assert "torch==2.13.0 torchvision==0.28.0" in (REPO / ".ci" / "run").read_text()
