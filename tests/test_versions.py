"""The versions install.sh installs for CI (.ci/floor-versions.txt) are pyproject's floors."""

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
    install = (REPO / "install.sh").read_text()
    assert "-c .ci/floor-versions.txt" in install
    spec = re.search(r'TORCH_SPEC=\$\{TORCH_SPEC:-"([^"]+)"\}', install).group(1)  # install.sh's default
    pins.update(part.split("==") for part in spec.split())
    assert set(pins) == {"torch", "torchvision", "diffusers", "transformers", "peft"}
    for name, version in pins.items():
        # "2.14" would allow 2.14.0: compare as padded tuples
        want = tuple(int(x) for x in floors[name].split(".")) + (0,) * 3
        got = tuple(int(x) for x in version.split(".")) + (0,) * 3
        assert want[:3] == got[:3], (name, floors[name], version)
