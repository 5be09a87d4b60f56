"""`retarget dataset build`: photos, folders and videos -> a training set of aligned faces in WebDataset shards.

For every sampled frame (videos: `sample_fps` frames per second; photos: the image) the largest face is
kept when it is big and sharp enough, as:
- `png`: the FFHQ-aligned crop (`crop_size` px, tracking.align.reference_and_identity: the Reference Adapter's alignment);
- `arcface.npy`: (512,) float32 unit ArcFace vector of that crop, computed as `RetargetPipeline.prepare_actor`
  does (keypoints carried through the alignment, the ArcFace 5-point crop, `arcface.onnx`);
- `exp.npy`: (55,) float32 SMIRK vector (expression 50 ++ eyelids 2 ++ jaw 3), the tracker's crop and encoder;
- `json`: source path, video id, time in seconds, frame index, face box, size and sharpness.

Written to `DATA/shard-00000.tar`, ... (WebDataset layout: members `<key>.<field>`), plus `manifest.json`
(shards, items, Reference Adapter pairs, counts, options) and `summary.txt`. The folder is built under a
temporary name and renamed at the end, so an interrupted build never leaves a half-made dataset.

Reference Adapter pairs (the paper's cross-paired video frames): within one video, each frame is paired
with up to `pairs_per_frame` other frames of the same video, those whose expressions differ most
(L2 distance of the 55-d vectors at least `min_pair_distance`); (reference, target) in both directions.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from render.errors import RetargetError

MANIFEST = "manifest.json"
SUMMARY = "summary.txt"
SHARD_PATTERN = "shard-%05d.tar"
FORMAT_VERSION = 1
VIDEO_EXTENSIONS = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg"}


@dataclass
class DatasetOptions:
    """What `retarget dataset build` samples and keeps (the CLI is generated from these fields)."""

    sample_fps: float = field(default=2.0, metadata={"help": "frames taken per second of video"})
    min_face: int = field(default=96, metadata={"help": "skip faces whose box is smaller than this (pixels, longer side)"})
    min_sharpness: float = field(default=15.0, metadata={
        "help": "skip blurry faces: variance of the Laplacian of the aligned crop at 256 px below this"})
    crop_size: int = field(default=512, metadata={"help": "size of the FFHQ-aligned crops (pixels)"})
    shard_size: int = field(default=1000, metadata={"help": "items per tar shard"})
    pairs_per_frame: int = field(default=4, metadata={"help": "Reference Adapter pairs per video frame"})
    min_pair_distance: float = field(default=0.1, metadata={
        "help": "pair frames only when their 55-d expression vectors are at least this far apart (L2)"})
    max_frames: int | None = field(default=None, metadata={"help": "stop after this many sampled frames per video"})
    batch_size: int = field(default=16, metadata={"help": "faces encoded per SMIRK/ArcFace batch"})
    device: str = field(default="auto", metadata={"choices": ("auto", "cuda", "cpu"), "help": "SMIRK device"})


@dataclass
class BuildSummary:
    """Counts of one build. `skipped_*` are faces (or frames) left out, `corrupt` the sources that failed."""

    output: str = ""
    sources: int = 0
    videos: int = 0
    photos: int = 0
    frames: int = 0
    items: int = 0
    pairs: int = 0
    skipped_no_face: int = 0
    skipped_tiny: int = 0
    skipped_blurry: int = 0
    ignored_files: list[str] = field(default_factory=list)
    corrupt: list[dict] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"dataset {self.output}",
                 f"  sources: {self.sources} ({self.videos} videos, {self.photos} photos)",
                 f"  frames sampled: {self.frames}",
                 f"  items kept: {self.items}",
                 f"  skipped: {self.skipped_no_face} without a face, {self.skipped_tiny} tiny faces, "
                 f"{self.skipped_blurry} blurry faces",
                 f"  Reference Adapter pairs: {self.pairs}"]
        if self.ignored_files:
            lines.append(f"  ignored (not an image or video): {len(self.ignored_files)}, e.g. {self.ignored_files[0]}")
        for c in self.corrupt:
            lines.append(f"  CORRUPT, skipped: {c['path']}: {c['error']}")
        return "\n".join(lines)


def sharpness(crop_rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the crop's grey image resized to 256x256 (resizing first makes the
    number independent of `crop_size`; a face upsampled from few pixels scores low, as it should)."""
    import cv2

    grey = cv2.cvtColor(np.asarray(crop_rgb), cv2.COLOR_RGB2GRAY)
    grey = cv2.resize(grey, (256, 256), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def expand_sources(sources: list[str | os.PathLike]) -> tuple[list[tuple[Path, str]], list[str]]:
    """Sources -> ([(path, "video" | "photo")], ignored files). Folders are searched recursively (sorted);
    each image in them is a photo, each video a video. Raises RetargetError for a missing source."""
    from render.video import IMAGE_EXTENSIONS

    out: list[tuple[Path, str]] = []
    ignored: list[str] = []

    def kind(p: Path) -> str | None:
        ext = p.suffix.lower()
        return "photo" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else None

    for s in sources:
        p = Path(s)
        if not p.exists():
            raise RetargetError(f"dataset source {p} does not exist")
        if p.is_dir():
            for q in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
                k = kind(q)
                (out.append((q, k)) if k else ignored.append(str(q)))
        else:
            # A file named on the command line is tried as a video when it is not an image.
            out.append((p, kind(p) or "video"))
    return out, ignored


def _sampled_frames(path: Path, kind: str, opts: DatasetOptions):
    """Yield (frame index, time in seconds, RGB) of the frames to use: every frame of a photo, about
    `sample_fps` per second of a video (the first frame at or after each 1/sample_fps tick)."""
    from render.video import open_video

    reader = open_video(path)
    if kind == "photo":
        for f in reader.frames():
            yield f.index, 0.0, f.rgb
        return
    step = 1.0 / opts.sample_fps
    next_t, n = 0.0, 0
    for f in reader.frames():
        if f.time_s + 1e-6 < next_t:
            continue
        yield f.index, f.time_s, f.rgb
        n += 1
        if opts.max_frames is not None and n >= opts.max_frames:
            return
        while next_t <= f.time_s + 1e-6:
            next_t += step


class _Encoders:
    """The face backend, ArcFace and SMIRK, loaded once from the weights layout."""

    def __init__(self, layout, device: str):
        from retarget.identity import ArcFaceEmbedder
        from tracking.faces import make_face_backend
        from tracking.smirk import load_smirk_encoder
        from tracking.tracker import resolve_device

        dev = resolve_device(device)
        # FFHQ alignment needs 68 landmarks: the identity backend (insightface with antelopev2, else dlib),
        # as `RetargetPipeline.prepare_actor` uses for the actor photo.
        self.faces = make_face_backend("auto", antelopev2_dir=layout.optional("antelopev2"))
        self.arcface = ArcFaceEmbedder(layout.require("arcface_onnx"),
                                       providers=None if dev == "cuda" else ["CPUExecutionProvider"])
        self.smirk = load_smirk_encoder(layout.require("smirk_ckpt"), device=dev)


def _face_item(rgb: np.ndarray, face, opts: DatasetOptions, backend) -> tuple[dict | None, str]:
    """Crops and measurements of one face, or (None, reason) when it is skipped ("tiny", "blurry").
    The crop and the identity are made as the pipeline makes an actor's (the FFHQ script's alignment,
    the face found again on it: tracking.align.reference_and_identity), so training sees what inference gives."""
    from tracking.align import reference_and_identity
    from tracking.tracker import encoder_crop

    x0, y0, x1, y1 = (float(v) for v in face.bbox)
    size = max(x1 - x0, y1 - y0)
    if size < opts.min_face or face.lmk68 is None:
        return None, "tiny"
    crop, _, crop112, _ = reference_and_identity(rgb, face, backend, size=opts.crop_size)
    sharp = sharpness(crop)
    if sharp < opts.min_sharpness:
        return None, "blurry"
    return {"crop": crop, "crop112": crop112, "smirk": encoder_crop(rgb, face), "bbox": [x0, y0, x1, y1],
            "face_size": size, "sharpness": sharp}, ""


def _png(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise RetargetError("could not encode a crop as PNG")
    return buf.tobytes()


def _npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, np.asarray(a, dtype=np.float32), allow_pickle=False)
    return b.getvalue()


def make_pairs(items: list[dict], exps: np.ndarray, per_frame: int, min_distance: float) -> list[list[int]]:
    """Reference Adapter pairs [reference index, target index] within each video (items' `video` field,
    photos have none): for each frame, the `per_frame` others of its video farthest from it in expression
    (L2 on the 55-d vectors), only those at least `min_distance` away. Deterministic (ties by index)."""
    by_video: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        if it.get("video") is not None:
            by_video.setdefault(it["video"], []).append(i)
    pairs = []
    for idx in by_video.values():
        e = exps[idx]
        d = np.linalg.norm(e[:, None, :] - e[None, :, :], axis=-1)
        for a in range(len(idx)):
            order = sorted((b for b in range(len(idx)) if b != a), key=lambda b: (-d[a, b], b))
            for b in [b for b in order if d[a, b] >= min_distance][:per_frame]:
                pairs.append([idx[a], idx[b]])
    return pairs


def build_dataset(sources: list[str | os.PathLike], output: str | os.PathLike, *, weights=None,
                  options: DatasetOptions | None = None, progress: bool = True) -> BuildSummary:
    """Build the dataset folder `output` from `sources` (photos, folders, videos) with the weights at
    `weights` (a folder or WeightsLayout: ArcFace, SMIRK, optional antelopev2). Returns the BuildSummary,
    also written to `output/summary.txt`. Corrupt sources are reported there and skipped. Raises
    RetargetError for bad options, an existing non-empty `output`, or when no face at all was kept."""
    import webdataset as wds
    from tqdm import tqdm

    from retarget.weights import WeightsLayout

    opts = options or DatasetOptions()
    out = Path(output)
    if opts.sample_fps <= 0 or opts.min_face < 1 or opts.crop_size < 64 or opts.shard_size < 1 \
            or opts.pairs_per_frame < 0 or opts.batch_size < 1:
        raise RetargetError("dataset options: --sample-fps > 0, --min-face >= 1, --crop-size >= 64, "
                            "--shard-size >= 1, --pairs-per-frame >= 0 and --batch-size >= 1 are required")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RetargetError(f"dataset folder {out} already exists and is not empty; choose a new -o folder")
    files, ignored = expand_sources(sources)
    if not files:
        raise RetargetError("no images or videos among the dataset sources")
    layout = weights if isinstance(weights, WeightsLayout) else WeightsLayout(weights)
    enc = _Encoders(layout, opts.device)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    summary = BuildSummary(output=str(out), ignored_files=ignored)
    items: list[dict] = []
    exps: list[np.ndarray] = []
    pending: list[tuple[dict, dict]] = []
    shard_counts: list[int] = []
    try:
        writer = wds.ShardWriter(str(tmp / SHARD_PATTERN), maxcount=opts.shard_size, verbose=0)

        def flush():
            if not pending:
                return
            vec = enc.smirk.encode(np.stack([f["smirk"] for f, _ in pending]))
            ids = enc.arcface(np.stack([f["crop112"] for f, _ in pending]))
            for (f, meta), e, a in zip(pending, vec, ids):
                n = len(items)
                shard = n // opts.shard_size
                if shard == len(shard_counts):
                    shard_counts.append(0)
                shard_counts[shard] += 1
                key = f"{n:08d}"
                meta = dict(meta, key=key, shard=shard, face_size=round(f["face_size"], 1),
                            sharpness=round(f["sharpness"], 2), bbox=[round(v, 1) for v in f["bbox"]])
                writer.write({"__key__": key, "png": _png(f["crop"]), "arcface.npy": _npy(a), "exp.npy": _npy(e),
                              "json": json.dumps(meta).encode()})
                items.append(meta)
                exps.append(e)
            pending.clear()

        bar = tqdm(total=len(files), unit="source", disable=not progress, file=sys.stderr)
        for src_id, (path, kind) in enumerate(files):
            summary.sources += 1
            video_id = src_id if kind == "video" else None
            try:
                for index, t, rgb in _sampled_frames(path, kind, opts):
                    summary.frames += 1
                    faces = enc.faces.detect(rgb)
                    if not faces:
                        summary.skipped_no_face += 1
                        continue
                    area = [float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])) for f in faces]
                    found, why = _face_item(rgb, faces[int(np.argmax(area))], opts, enc.faces)
                    if found is None:
                        summary.skipped_tiny += why == "tiny"
                        summary.skipped_blurry += why == "blurry"
                        continue
                    pending.append((found, {"source": str(path), "source_id": src_id, "video": video_id,
                                            "frame": int(index), "time_s": round(float(t), 4)}))
                    if len(pending) >= opts.batch_size:
                        flush()
            except RetargetError as e:
                # A corrupt source is reported and skipped; frames decoded before the error stay.
                summary.corrupt.append({"path": str(path), "error": str(e)})
            else:
                if kind == "video":
                    summary.videos += 1
                else:
                    summary.photos += 1
            flush()
            bar.update(1)
        bar.close()
        writer.close()
        summary.items = len(items)
        if not items:
            raise RetargetError(f"no usable face in the {summary.sources} sources ({summary.skipped_no_face} frames "
                                f"without a face, {summary.skipped_tiny} tiny, {summary.skipped_blurry} blurry); "
                                "try a lower --min-face or --min-sharpness")
        pairs = make_pairs(items, np.stack(exps), opts.pairs_per_frame, opts.min_pair_distance)
        summary.pairs = len(pairs)
        manifest = {
            "format": "retarget-dataset", "version": FORMAT_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "options": asdict(opts), "weights": str(layout.root),
            "fields": {"png": f"FFHQ-aligned crop {opts.crop_size}x{opts.crop_size} RGB",
                       "arcface.npy": "(512,) float32 unit ArcFace vector",
                       "exp.npy": "(55,) float32 FLAME expression 50 ++ eyelids 2 ++ jaw 3 (SMIRK)",
                       "json": "source, video, frame, time_s, bbox, face_size, sharpness"},
            "shards": [{"name": SHARD_PATTERN % i, "count": c} for i, c in enumerate(shard_counts)],
            "items": [{"key": it["key"], "shard": it["shard"], "source_id": it["source_id"], "video": it["video"],
                       "time_s": it["time_s"]} for it in items],
            "pairs": pairs,
            "summary": asdict(summary),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (tmp / SUMMARY).write_text(summary.text() + "\n")
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
