"""Does the memory layout of q/k/v change the speed of quality mode's attention kernel?

bench/quality_mode.py found the same cuDNN SDPA kernel (head dim 40, 64x128x64 tiles) 11% slower inside the
compiled call than eager. The eager reader hands SDPA views of (rows, tokens, heads * head_dim) projections
transposed to (rows, heads, tokens, head_dim) ("views": heads interleaved in memory); inductor may hand it
tensors materialised as (rows, heads, tokens, head_dim) ("contiguous"). This times the kernel on quality
mode's largest shapes (the 64x64 level: 4,096 queries, 8 heads of 40; the conditional rows read 8,192 keys
with the bank, the unconditional ones 4,096) in both layouts, and checks both give the same output.

    python bench/attention_layout.py          # GPU, fp16, B=32 rows, cuDNN preferred: table + JSON in bench/results
    python bench/attention_layout.py --tiny   # CPU smoke run: small shapes, torch's default kernel
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline as pipeline_bench  # noqa: E402  (write_json)


def operands(rows: int, queries: int, keys: int, heads: int, head_dim: int, layout: str, device, dtype, seed=0):
    """q (rows, heads, queries, head_dim), k and v (rows, heads, keys, head_dim) of the same values in either
    layout: "views" (transposed views of (rows, tokens, heads * head_dim), as the eager reader makes them) or
    "contiguous" (materialised in (rows, heads, tokens, head_dim) order)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def one(tokens):
        x = torch.randn(rows, tokens, heads * head_dim, generator=g).to(device=device, dtype=dtype)
        x = x.view(rows, tokens, heads, head_dim).transpose(1, 2)
        return x.contiguous() if layout == "contiguous" else x

    return one(queries), one(keys), one(keys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: small shapes")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls per case (median; default 20, tiny 2)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results)")
    args = ap.parse_args(argv)
    from retarget.kernels import attention_backend, sdpa_choice

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    rows, queries, heads, head_dim = (32, 4096, 8, 40) if cuda else (2, 64, 2, 8)
    repeat = args.repeat or (20 if cuda else 2)
    gpu = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    cases = {"conditional rows: the frame's tokens + the bank's": 2 * queries,
             "unconditional rows: the frame's tokens": queries}
    result = {"gpu": gpu, "torch": torch.__version__, "tiny": args.tiny,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "rows": rows, "queries": queries, "heads": heads, "head_dim": head_dim, "cases": {}}
    print(f"{gpu}, {dtype}, torch {torch.__version__}, {rows} rows, {queries} queries, {heads}x{head_dim}")
    with attention_backend("cudnn" if cuda else "auto", device):
        for label, keys in cases.items():
            row, outs = {}, {}
            for layout in ("views", "contiguous"):
                q, k, v = operands(rows, queries, keys, heads, head_dim, layout, device, dtype)
                run = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                outs[layout] = run()
                sec = pipeline_bench.timed(run, device, repeat)
                flop = 4 * rows * heads * queries * keys * head_dim
                row[layout] = {"ms": 1e3 * sec, "tflops": flop / sec / 1e12, "kernel": sdpa_choice(q, k, v),
                               "strides": list(q.stride())}
            diff = (outs["views"].float() - outs["contiguous"].float()).abs().max().item()
            row["max_abs_views_vs_contiguous"] = diff
            row["contiguous_over_views"] = row["contiguous"]["ms"] / row["views"]["ms"]
            result["cases"][label] = row
            print(f"{label} ({keys} keys): views {row['views']['ms']:.3f} ms ({row['views']['tflops']:.0f} TFLOP/s), "
                  f"contiguous {row['contiguous']['ms']:.3f} ms ({row['contiguous']['tflops']:.0f}); "
                  f"contiguous/views x{row['contiguous_over_views']:.3f}; kernel {row['views']['kernel']}; "
                  f"max |d| {diff:.2e}")
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_") or "cpu"
    path = out_dir / f"attention_layout_{'tiny_' if args.tiny else ''}{tag}_{dt.date.today().isoformat()}.json"
    pipeline_bench.write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
