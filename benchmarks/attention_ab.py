"""The C prefill attention (``paged_prefill_attention.c``) of a git revision against this tree's, and a drafted
sequence's verification as one-token decode rows against one chunk, side by side in one run.

    python benchmarks/attention_ab.py [--base REV] [--repeats 5] [--threads 2]

Builds ``paged_prefill_attention.c`` (with the headers) of ``--base`` (default ``HEAD``) into a temporary library with
the flags the project's library is built with, and times one layer's attention, SmolLM2-135M's geometry (9 query
heads, 3 KV heads, 64 wide, 16-token blocks), fp32 and bf16, on K/V read from the blocks:

- ``prefill``: the base kernel and this tree's on the same plan, alternating, best of ``--repeats``, for verification
  shapes (S sequences of q tokens after a cached context, as drafts are verified) and prompt shapes (whole prompts and
  a chunk after a long context); the outputs are checked equal within rounding;
- ``verify``: this tree's two ways of attending a drafted sequence's 1 + k tokens: one-token rows through the decode
  kernel (each reads the sequence's K/V again) and one chunk through the prefill kernel (reads them once).

Prints microseconds per call and the ratios (current / base; chunk / rows).
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
from hf_paged.execution.kernels.cpu_decode_attention import DecodePlan  # noqa: E402
from hf_paged.execution.kernels.cpu_prefill_attention import PrefillPlan  # noqa: E402

CSRC = "hf_paged/execution/kernels/csrc"
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
VERIFY = [(1, 400, 6), (1, 400, 11), (4, 400, 6), (4, 400, 11), (4, 1000, 8), (32, 400, 4)]  # (S, context, q)
PROMPTS = [(1, 0, 128), (1, 0, 512), (1, 0, 2048), (1, 1024, 256), (4, 0, 256)]


def build_base(rev: str, out_dir: Path):
    for name in ("paged_prefill_attention.c", "cpu_vec.h", "hf_paged_kernels.h"):
        text = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{rev}:{CSRC}/{name}"], check=True,
                              capture_output=True, text=True).stdout
        (out_dir / name).write_text(text)
    lib = out_dir / "base.so"
    subprocess.run(["gcc", *cpu_library.compiler_flags(), str(out_dir / "paged_prefill_attention.c"), "-o", str(lib),
                    "-lm"], check=True)
    fn = ctypes.CDLL(str(lib)).hf_paged_prefill_attention
    fn.argtypes, fn.restype = cpu_library.load().hf_paged_prefill_attention.argtypes, ctypes.c_int
    return fn


def shapes(S: int, context: int, q: int, dtype: torch.dtype):
    blocks = (context + q + BLOCK - 1) // BLOCK
    g = torch.Generator().manual_seed(S * 1000 + context + q)
    kc = torch.randn(S * blocks + 1, BLOCK, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    vc = torch.randn(kc.shape, generator=g).to(dtype)
    tables = torch.arange(1, S * blocks + 1).view(S, blocks)
    x = torch.randn(S * q, HEADS, HEAD_DIM, generator=g).to(dtype)
    return kc, vc, tables, x


def best_of(repeats: int, calls: dict) -> dict:
    """Each call's best time (µs), the calls alternating."""
    best = {name: float("inf") for name in calls}
    n = max(1, int(2e-3 / max(_once(f) for f in calls.values())))  # ~2 ms a sample
    for _ in range(repeats):
        for name, f in calls.items():
            start = time.perf_counter()
            for _ in range(n):
                f()
            best[name] = min(best[name], (time.perf_counter() - start) / n * 1e6)
    return best


def _once(f) -> float:
    f()
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(args.base, Path(tmp))
        print(f"# C prefill attention: {args.base} (base) against this tree; a drafted sequence's 1 + k tokens as "
              f"decode rows against one chunk. SmolLM2-135M heads ({HEADS}/{KV_HEADS} x {HEAD_DIM}), {args.threads} "
              f"threads, best of {args.repeats}, µs per layer call")
        print(f"{'dtype':8} {'kind':7} {'S':>3} {'context':>7} {'q':>5} {'base':>9} {'current':>9} {'cur/base':>8} "
              f"{'rows':>9} {'chunk':>9} {'chunk/rows':>10}")
        for dtype in (torch.float32, torch.bfloat16):
            for kind, cases in (("verify", VERIFY), ("prompt", PROMPTS)):
                for S, context, q in cases:
                    kc, vc, tables, x = shapes(S, context, q, dtype)
                    plan = PrefillPlan.for_step(x, kc, vc, tables, [s * q for s in range(S)], [q] * S,
                                                [context + q] * S, 0.125)
                    base_plan = PrefillPlan.for_step(x, kc, vc, tables, [s * q for s in range(S)], [q] * S,
                                                     [context + q] * S, 0.125)
                    base_plan.fn = base
                    outs = {"base": torch.empty_like(x), "current": torch.empty_like(x), "rows": torch.empty_like(x)}
                    calls = {"base": lambda: base_plan(x, kc, vc, outs["base"]),
                             "current": lambda: plan(x, kc, vc, outs["current"])}
                    if kind == "verify":
                        lens = torch.tensor([context + j + 1 for _ in range(S) for j in range(q)], dtype=torch.int32)
                        rows = DecodePlan.for_step(x, kc, vc, tables.repeat_interleave(q, 0), lens, 0.125, None, None)
                        calls["rows"] = lambda: rows(x, kc, vc, outs["rows"])
                    best = best_of(args.repeats, calls)
                    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
                    for name in outs if kind == "verify" else ("base",):
                        torch.testing.assert_close(outs[name].float(), outs["current"].float(), atol=tol, rtol=tol)
                    rows_cols = (f"{best['rows']:9.1f} {best['current']:9.1f} {best['current'] / best['rows']:10.2f}"
                                 if "rows" in best else "")
                    print(f"{str(dtype)[6:]:8} {kind:7} {S:3d} {context:7d} {q:5d} {best['base']:9.1f} "
                          f"{best['current']:9.1f} {best['current'] / best['base']:8.2f} {rows_cols}", flush=True)


if __name__ == "__main__":
    main()
