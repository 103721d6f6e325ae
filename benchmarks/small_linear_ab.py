"""The small-row linear kernel (``small_linear.c``) of a git revision against this tree's, side by side in one run.

    python benchmarks/small_linear_ab.py [--base REV | --small-pages] [--rows 1,4,8,16,24,32,48] [--threads 1,2]
                                         [--repeats 3] [--dtype float32|bfloat16]

Builds ``small_linear.c`` (with the headers) of ``--base`` (default ``HEAD``) into a temporary library with the
flags the project's library is built with, then times both on every linear of the embedded model (SmolLM2-135M in
``--dtype``, the packed weights the engine uses: one decode step's worth of products), alternating base and current
``--repeats`` times per row count and thread count; prints the best of each and current / base, and checks that both
give the same bits.

``--small-pages``: the base is this tree's kernel too, on a copy of the packed weights in ordinary memory (4 KB
pages where transparent huge pages are ``madvise``, as on most distributions), against the engine's packed weights
on huge pages (``cpu_runtime.empty_on_huge_pages``).
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hf_paged.execution.kernels import cpu_library  # noqa: E402
from hf_paged.execution.patches.linear import SmallRowsWeight  # noqa: E402
from hf_paged.models import load_default_model  # noqa: E402

CSRC = "hf_paged/execution/kernels/csrc"


def build_base(rev: str, out_dir: Path) -> ctypes.CDLL:
    for name in ("small_linear.c", "cpu_vec.h", "hf_paged_kernels.h"):
        text = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{rev}:{CSRC}/{name}"], check=True,
                              capture_output=True, text=True).stdout
        (out_dir / name).write_text(text)
    lib = out_dir / "base.so"
    subprocess.run(["gcc", *cpu_library.compiler_flags(), str(out_dir / "small_linear.c"), "-o", str(lib)], check=True)
    base = ctypes.CDLL(str(lib))
    v, n = ctypes.c_void_p, ctypes.c_long
    base.hf_small_linear_f32.argtypes = [v, n, n, v, v, n, n, v, n, ctypes.c_int]
    base.hf_small_linear_bf16.argtypes = [v, n, n, v, v, n, n, v, n, ctypes.c_int]
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD")
    ap.add_argument("--rows", default="1,4,8,16,24,32,48")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--small-pages", action="store_true",
                    help="base: this tree's kernel on the packed weights copied to ordinary memory")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model, _ = load_default_model(dtype)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    packed = [SmallRowsWeight(m.weight) for m in linears]
    weights = {"current": [p.packed for p in packed]}
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    with tempfile.TemporaryDirectory() as tmp:
        if args.small_pages:
            base = None
            weights["base"] = [p.packed.clone() for p in packed]
            print(f"# small_linear.c on packed weights in ordinary memory (base) against huge pages (current), "
                  f"THP {thp.read_text().strip() if thp.exists() else '?'}, SmolLM2-135M {args.dtype} linears, "
                  f"best of {args.repeats}")
        else:
            base = build_base(args.base, Path(tmp))
            weights["base"] = weights["current"]
            print(f"# small_linear.c: {args.base} (base) against this tree (current), SmolLM2-135M {args.dtype} "
                  f"linears, best of {args.repeats}")
        print(f"{'threads':>7} {'rows':>5} {'base ms':>8} {'current ms':>10} {'current/base':>12}")
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            for rows in [int(r) for r in args.rows.split(",")]:
                xs = {k: torch.randn(rows, k).to(dtype) for k in {m.in_features for m in linears}}
                outs = {name: [torch.empty(rows, m.out_features, dtype=dtype) for m in linears]
                        for name in ("base", "current")}
                kernels = {"base": packed[0]._linear if base is None else
                           base.hf_small_linear_bf16 if dtype == torch.bfloat16 else base.hf_small_linear_f32,
                           "current": packed[0]._linear}

                def once(name: str) -> float:
                    start = time.perf_counter()
                    for m, w, out in zip(linears, weights[name], outs[name]):
                        x = xs[m.in_features]
                        kernels[name](x.data_ptr(), x.stride(0), rows, w.data_ptr(), None, m.out_features,
                                      m.in_features, out.data_ptr(), m.out_features, threads)
                    return time.perf_counter() - start

                best = {"base": float("inf"), "current": float("inf")}
                for name in best:
                    once(name)  # warm-up
                for _ in range(args.repeats):
                    for name in best:
                        best[name] = min(best[name], once(name))
                same = all(torch.equal(a, b) for a, b in zip(outs["base"], outs["current"]))
                print(f"{threads:7d} {rows:5d} {best['base'] * 1e3:8.1f} {best['current'] * 1e3:10.1f} "
                      f"{best['current'] / best['base']:12.2f}" + ("" if same else "  (outputs differ)"), flush=True)


if __name__ == "__main__":
    main()
