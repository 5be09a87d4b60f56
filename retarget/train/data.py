"""Reading a dataset folder written by `dataset_build`, and the seeded order in which training sees it.

`TrainData` indexes the tar shards once (member offsets) and reads any item directly: no unpacking,
no streaming state, so the sample at any position of a run is known without replaying the run.
`SampleOrder` maps a global sample position (micro-step * global batch + slot) to a dataset index:
epoch e is a permutation drawn from (seed, e). With data parallel training, process p takes slots
[p * batch, (p + 1) * batch) of each global batch, so N processes of batch b see exactly the samples one
process of batch N * b sees, and a resumed run continues the same sequence.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from pathlib import Path

import numpy as np

from render.errors import RetargetError
from retarget.train.dataset_build import FORMAT_VERSION, MANIFEST

FIELDS = ("png", "arcface.npy", "exp.npy", "json")


class TrainData:
    """Random access to a dataset folder. `len(data)` items; `data[i]` -> dict with `image` (S, S, 3) uint8
    RGB, `arcface` (512,) float32, `exp` (55,) float32, `meta` (dict). `pairs`: (P, 2) int array of
    [reference, target] item indices (Reference Adapter). Raises RetargetError for a missing or broken
    folder, naming it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise RetargetError(f"{self.folder} is not a dataset folder (no {MANIFEST}); "
                                "make one with `retarget dataset build`")
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RetargetError(f"{path} is not readable JSON: {e}") from None
        if self.manifest.get("format") != "retarget-dataset" or self.manifest.get("version") != FORMAT_VERSION:
            raise RetargetError(f"{path}: not a retarget dataset of version {FORMAT_VERSION}")
        self.items = self.manifest["items"]
        self.pairs = np.asarray(self.manifest.get("pairs", []), dtype=np.int64).reshape(-1, 2)
        self._index: dict[str, dict[str, tuple[int, int, int]]] = {}
        for s, shard in enumerate(self.manifest["shards"]):
            tar_path = self.folder / shard["name"]
            try:
                with tarfile.open(tar_path) as tf:
                    for m in tf:
                        key, _, ext = m.name.partition(".")
                        self._index.setdefault(key, {})[ext] = (s, m.offset_data, m.size)
            except (OSError, tarfile.TarError) as e:
                raise RetargetError(f"dataset shard {tar_path} is missing or broken: {e}") from None
        for it in self.items:
            got = self._index.get(it["key"], {})
            if any(f not in got for f in FIELDS):
                raise RetargetError(f"{self.folder}: item {it['key']} lacks fields "
                                    f"{[f for f in FIELDS if f not in got]} in its shard")
        self._files: dict[int, object] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()  # the loader thread and validation share the file handles

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, key: str, field: str) -> bytes:
        if os.getpid() != self._pid:  # a forked process opens its own handles
            self._files, self._pid, self._lock = {}, os.getpid(), threading.Lock()
        shard, offset, size = self._index[key][field]
        with self._lock:
            f = self._files.get(shard)
            if f is None:
                f = self._files[shard] = open(self.folder / self.manifest["shards"][shard]["name"], "rb")
            f.seek(offset)
            return f.read(size)

    def __getitem__(self, i: int) -> dict:
        import cv2

        key = self.items[int(i)]["key"]
        png = np.frombuffer(self._read(key, "png"), np.uint8)
        bgr = cv2.imdecode(png, cv2.IMREAD_COLOR)
        if bgr is None:
            raise RetargetError(f"{self.folder}: the image of item {key} does not decode")
        return {"image": np.ascontiguousarray(bgr[:, :, ::-1]),
                "arcface": np.load(io.BytesIO(self._read(key, "arcface.npy"))),
                "exp": np.load(io.BytesIO(self._read(key, "exp.npy"))),
                "meta": json.loads(self._read(key, "json"))}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


class SampleOrder:
    """Global sample position -> index in [0, n): epoch by epoch, each a permutation drawn from (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise RetargetError("the dataset holds no samples for this training mode")
        self.n, self.seed = int(n), int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def __call__(self, position: int) -> int:
        epoch, k = divmod(int(position), self.n)
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 4:
                self._perms.clear()
            perm = self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(perm[k])


def positions(micro_step: int, batch: int, num_processes: int, rank: int) -> list[int]:
    """Global sample positions of process `rank`'s batch at `micro_step` (see the module docstring)."""
    start = (micro_step * num_processes + rank) * batch
    return list(range(start, start + batch))
