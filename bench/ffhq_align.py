"""The actor's reference alignment: exactness, speed, and which identity crop matches the release.

    python bench/ffhq_align.py                      # astronaut and its variants (CPU)
    python bench/ffhq_align.py --photos DIR         # and every image in DIR
    python bench/ffhq_align.py --tiny               # seconds-long smoke run

Three parts, on skimage's astronaut (a real face) and copies made from it (2048 px, rotated
and scaled, cut so that the quad leaves the photo, 2048 px and cut), plus any photos given:
- align: the published procedure (the transcription of ffhq-dataset's
  ``recreate_aligned_images`` in tests/tracking/test_align_exact.py) against
  ``tracking.align.ffhq_align_exact`` (all threads and one) and the per-frame ``ffhq_crop``:
  differences in levels and seconds (median of --repeats, wall and process CPU);
- identity: the release embeds the face found again on the aligned 512 image; we could also
  carry the photo's keypoints through M. Keypoint gap (512 and 112 px), the two 112x112
  ArcFace crops' difference, and dlib's face descriptor distance (same person < 0.6) between
  them; "photo" is the crop of the unaligned photo, for scale;
- prepare_actor: seconds for the whole once-per-video step on the tiny weights with the dlib
  backend (detect, align, detect again, ArcFace, VAE, writer; the tiny models cost ~nothing,
  so this is the CPU work around the networks) on the 2048 px copies, and its stages.

Writes bench/results/ffhq_align_<device>_<date>.json (or --out-dir) and prints tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tracking.align import (  # noqa: E402
    aligned_identity_crop,
    apply_affine,
    arcface_crop,
    ffhq_align_exact,
    ffhq_crop,
)
from tracking.faces import DlibBackend, dlib_predictor_path  # noqa: E402


def _published():
    """The transcription of the dataset script that the tests hold."""
    path = ROOT / "tests" / "tracking" / "test_align_exact.py"
    spec = importlib.util.spec_from_file_location("_published_ffhq_module", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._published_ffhq


def _warp_about(img, centre, angle, scale, canvas):
    import cv2

    A = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, scale)
    A[:, 2] += np.array([canvas / 2.0, canvas / 2.0]) - np.asarray(centre, dtype=np.float64)
    return cv2.warpAffine(img, A, (canvas, canvas), flags=cv2.INTER_LINEAR, borderValue=(128, 128, 128))


def photos(backend, extra_dir: str | None, tiny: bool) -> dict[str, np.ndarray]:
    import cv2
    from PIL import Image
    from skimage import data

    ast = np.ascontiguousarray(data.astronaut())
    out = {"astronaut": ast}
    if tiny:
        return out
    centre = backend.detect(ast)[0].lmk68.mean(0)
    big = cv2.resize(ast, (2048, 2048), interpolation=cv2.INTER_CUBIC)
    out.update({
        "astronaut_2048": big,
        "astronaut_rot20_x1.25": _warp_about(ast, centre, 20.0, 1.25, 640),
        "astronaut_rot-15_x0.7": _warp_about(ast, centre, -15.0, 0.7, 384),
        "astronaut_cut": np.ascontiguousarray(ast[60:, 165:]),  # the quad leaves the photo
        "astronaut_2048_cut": np.ascontiguousarray(cv2.resize(ast[60:, 165:], (2048, 2048 * 452 // 347),
                                                              interpolation=cv2.INTER_CUBIC)),
    })
    if extra_dir:
        for p in sorted(Path(extra_dir).iterdir()):
            try:
                out[p.name] = np.asarray(Image.open(p).convert("RGB"))
            except OSError:
                continue
    return out


def _timed(fn, repeats: int):
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return result, float(np.median(walls)), float(np.median(cpus))


def _diff(a, b) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max": int(d.max()), "mean": float(d.mean()), "p99": float(np.percentile(d, 99)),
            "frac_differ": float((d > 0).mean())}


def bench_align(images, backend, repeats: int) -> list[dict]:
    published = _published()
    rows = []
    for name, img in images.items():
        faces = backend.detect(img)
        if not faces:
            rows.append({"photo": name, "error": "no face"})
            continue
        lm = faces[0].lmk68
        ref, ref_w, ref_c = _timed(lambda: published(img, lm, 512), repeats)
        (ours, M), w, c = _timed(lambda: ffhq_align_exact(img, lm, 512), repeats)
        (one, _), w1, c1 = _timed(lambda: ffhq_align_exact(img, lm, 512, threads=1), repeats)
        (fast, _), wf, cf = _timed(lambda: ffhq_crop(img, lm, 512), repeats)
        rows.append({
            "photo": name, "size": list(img.shape[:2]),
            "published_s": {"wall": ref_w, "cpu": ref_c},
            "exact_s": {"wall": w, "cpu": c}, "exact_1thread_s": {"wall": w1, "cpu": c1},
            "fast_s": {"wall": wf, "cpu": cf},
            "exact_vs_published": _diff(ours, ref), "exact_threads_vs_1": _diff(ours, one),
            "fast_vs_published": _diff(fast, ref),
        })
    return rows


def bench_identity(images, backend) -> list[dict]:
    import dlib

    rec = dlib.face_recognition_model_v1(str(dlib_predictor_path().parent / "dlib_face_recognition_resnet_model_v1.dat"))

    def desc(crop112):
        import cv2

        chip = cv2.resize(crop112, (150, 150), interpolation=cv2.INTER_CUBIC)  # dlib's chip size
        return np.array(rec.compute_face_descriptor(chip))

    rows = []
    for name, img in images.items():
        faces = backend.detect(img)
        if not faces:
            continue
        face = faces[0]
        aligned, M = ffhq_align_exact(img, face.lmk68, 512)
        carried = apply_affine(M, face.kps5).astype(np.float32)
        release, kps, found = aligned_identity_crop(backend, aligned, carried)
        if not found:
            rows.append({"photo": name, "error": "no face found again on the aligned image"})
            continue
        ours, _ = arcface_crop(aligned, carried)
        M112 = arcface_crop(aligned, kps)[1]
        photo, _ = arcface_crop(img, face.kps5)
        d512 = np.linalg.norm(kps - carried, axis=1)
        d112 = np.linalg.norm(apply_affine(M112, kps) - apply_affine(M112, carried), axis=1)
        pix = np.abs(ours.astype(np.float32) - release.astype(np.float32))
        pix_photo = np.abs(photo.astype(np.float32) - release.astype(np.float32))
        rows.append({
            "photo": name,
            "kps_gap_512px": {"mean": float(d512.mean()), "max": float(d512.max())},
            "kps_gap_112px": {"mean": float(d112.mean()), "max": float(d112.max())},
            "carried_vs_release_crop": {"mean": float(pix.mean()), "p99": float(np.percentile(pix, 99))},
            "photo_vs_release_crop": {"mean": float(pix_photo.mean()), "p99": float(np.percentile(pix_photo, 99))},
            "dlib_descriptor_distance": {"carried": float(np.linalg.norm(desc(ours) - desc(release))),
                                         "photo": float(np.linalg.norm(desc(photo) - desc(release)))},
        })
    return rows


def bench_prepare_actor(images, repeats: int) -> list[dict]:
    import torch

    from retarget.pipeline import RetargetPipeline
    from retarget.tiny import write_tiny_weights
    from retarget.weights import WeightsLayout

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_weights(Path(tmp))
        pipe = RetargetPipeline.from_weights(WeightsLayout(Path(tmp)), device="cpu", dtype=torch.float32)
        pipe.face_backend = DlibBackend()
        pipe.prepare_actor(images["astronaut"], seed=0)  # loads the dlib models and warms up
        for name in [n for n in images if "2048" in n] or ["astronaut"]:
            img = images[name]
            _, w, c = _timed(lambda: pipe.prepare_actor(img, seed=0), repeats)
            faces, wd, cd = _timed(lambda: pipe.face_backend.detect(img), repeats)
            (aligned, M), wa, ca = _timed(lambda: ffhq_align_exact(img, faces[0].lmk68, 512), repeats)
            (crop112, _, _), wr, cr = _timed(
                lambda: aligned_identity_crop(pipe.face_backend, aligned, apply_affine(M, faces[0].kps5)), repeats)
            vec, wi, ci = _timed(lambda: pipe.arcface(crop112)[0], repeats)
            _, wm, cm = _timed(lambda: pipe.make_actor(vec, aligned, seed=0), repeats)
            # Before this work: ffhq_crop's warp and the keypoints carried through its M.
            (fast, Mf), wf, cf = _timed(lambda: ffhq_crop(img, faces[0].lmk68, 512), repeats)
            rows.append({
                "photo": name, "size": list(img.shape[:2]), "prepare_actor_s": {"wall": w, "cpu": c},
                "stages_s": {"detect_photo": {"wall": wd, "cpu": cd}, "align_exact": {"wall": wa, "cpu": ca},
                             "detect_aligned_and_crop": {"wall": wr, "cpu": cr}, "arcface": {"wall": wi, "cpu": ci},
                             "make_actor": {"wall": wm, "cpu": cm}},
                "before_align_fast_s": {"wall": wf, "cpu": cf},
            })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", help="a folder of extra photos (any PIL-readable images)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="astronaut only, one repeat")
    ap.add_argument("--only", choices=["align", "identity", "prepare"], help="run one part")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch and OpenCV threads (0: their defaults); 1 makes CPU seconds a one-core figure")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    repeats = 1 if args.tiny else args.repeats
    if args.threads:
        import cv2
        import torch

        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)

    backend = DlibBackend()
    images = photos(backend, args.photos, args.tiny)
    import cv2
    import PIL
    import scipy

    result = {
        "environment": {
            "date": dt.date.today().isoformat(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "python": platform.python_version(),
            "numpy": np.__version__, "pillow": PIL.__version__, "scipy": scipy.__version__, "opencv": cv2.__version__,
        },
        "config": {"repeats": repeats, "tiny": args.tiny, "photos_dir": args.photos},
    }
    result["config"]["threads"] = args.threads
    parts = [args.only] if args.only else ["align", "identity", "prepare"]
    result["align"] = bench_align(images, backend, repeats) if "align" in parts else []
    result["identity"] = bench_identity(images, backend) if "identity" in parts else []
    result["prepare_actor"] = bench_prepare_actor(images, repeats) if "prepare" in parts else []
    result["environment"]["loadavg_at_end"] = os.getloadavg()

    print("align (512 px; seconds are medians, wall/cpu; differences in levels against the published procedure)")
    print(f"{'photo':24s} {'published':>12s} {'exact':>12s} {'exact 1thr':>12s} {'fast':>12s}  exact max/frac   fast mean/p99/max")
    for r in result["align"]:
        if "error" in r:
            print(f"{r['photo']:24s} {r['error']}")
            continue
        t = lambda k: f"{r[k]['wall']:.2f}/{r[k]['cpu']:.2f}"  # noqa: E731
        e, f = r["exact_vs_published"], r["fast_vs_published"]
        print(f"{r['photo']:24s} {t('published_s'):>12s} {t('exact_s'):>12s} {t('exact_1thread_s'):>12s} "
              f"{t('fast_s'):>12s}  {e['max']}/{e['frac_differ']:.1e}        {f['mean']:.2f}/{f['p99']:.0f}/{f['max']}")
    print("\nidentity: keypoints carried through M vs found again on the aligned image (the release)")
    print(f"{'photo':24s} {'gap 512px':>10s} {'gap 112px':>10s} {'crop diff':>10s} {'p99':>5s} {'dlib d':>7s} | photo crop: diff, dlib d")
    for r in result["identity"]:
        if "error" in r:
            print(f"{r['photo']:24s} {r['error']}")
            continue
        print(f"{r['photo']:24s} {r['kps_gap_512px']['mean']:10.2f} {r['kps_gap_112px']['mean']:10.2f} "
              f"{r['carried_vs_release_crop']['mean']:10.1f} {r['carried_vs_release_crop']['p99']:5.0f} "
              f"{r['dlib_descriptor_distance']['carried']:7.3f} | {r['photo_vs_release_crop']['mean']:.1f}, "
              f"{r['dlib_descriptor_distance']['photo']:.3f}")
    print(f"\nprepare_actor (tiny weights, dlib; median wall/cpu seconds; {args.threads or 'all'} threads)")
    for r in result["prepare_actor"]:
        s, t = r["stages_s"], r["prepare_actor_s"]
        print(f"{r['photo']:24s} total {t['wall']:.2f}/{t['cpu']:.2f}: "
              + ", ".join(f"{k} {v['wall']:.2f}/{v['cpu']:.2f}" for k, v in s.items())
              + f"; before: ffhq_crop {r['before_align_fast_s']['wall']:.2f}/{r['before_align_fast_s']['cpu']:.2f}")

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("_tiny" if args.tiny else "") + (f"_{args.tag}" if args.tag else "")
    path = out / f"ffhq_align_cpu_{result['environment']['date']}{tag}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
