"""Where the time of an engine step goes: SmolLM2, B sequences of 128 prompt tokens decoding, one step
profiled with torch.profiler and its self CPU time sorted into matmuls, attention, cache writes, sampling
and the rest (elementwise ops, norms, rope, copies and per-op dispatch overhead).

    benchmarks/profile_step.py [--batch 32,64] [--dtype float32] [--compile] [--no-pack] [--steps 5]

Prints the unprofiled decode step time first (the profiler itself adds per-op overhead), then the shares.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CATEGORIES = {  # profiler row name -> category; anything else is "other"
    "aten::mm": "matmul", "aten::addmm": "matmul", "aten::bmm": "matmul", "mkldnn::_linear_pointwise": "matmul",
    "hf_paged::paged_decode_attention": "attention", "hf_paged::paged_prefill_attention": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_softmax": "attention", "aten::index_copy_": "cache write",
    "aten::argmax": "sampling", "aten::max": "sampling",
    "aten::log_softmax": "sampling", "aten::_log_softmax": "sampling",
}


def profile(batch: int, dtype: str, compile: bool, pack: bool, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from hf_paged import FinishReason, LLMEngine, SamplingParams
    from hf_paged.models import load_default_model

    model, tok = load_default_model(dtype=getattr(torch, dtype))
    engine = LLMEngine(model, tok, memory_bytes=1 << 30, enable_prefix_caching=False, compile=compile,
                       pack_weights=pack)
    params = SamplingParams(max_new_tokens=200, min_new_tokens=200, temperature=0.0)
    seqs = [engine.make_sequence([(i * 7 + j * 13) % 40000 + 100 for j in range(128)], params) for i in range(batch)]
    for seq in seqs:
        engine.scheduler.add(seq)
    start = time.perf_counter()
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    prefill_s = time.perf_counter() - start
    for _ in range(3):
        engine.step()
    start = time.perf_counter()
    for _ in range(10):
        engine.step()
    step_ms = (time.perf_counter() - start) * 100
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    totals: dict[str, float] = defaultdict(float)
    for row in prof.key_averages():
        totals[CATEGORIES.get(row.key, "other")] += row.self_cpu_time_total
    for seq in seqs:  # stop here, in this thread (abort() would hand it to the engine thread)
        engine.outputs.finish(seq, FinishReason.ABORT)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    everything = sum(totals.values())
    return {"batch": batch, "dtype": dtype, "compile": compile, "pack": pack, "prefill_s": prefill_s,
            "step_ms": step_ms, "profiled_step_ms": everything / 1e3 / steps,
            "shares": {k: v / everything for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="32,64")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-pack", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    for batch in map(int, args.batch.split(",")):
        for dtype in args.dtype.split(","):
            r = profile(batch, dtype, args.compile, not args.no_pack, args.steps)
            shares = "  ".join(f"{k} {v:.1%}" for k, v in r["shares"].items())
            attn = r["shares"].get("attention", 0) + r["shares"].get("cache write", 0)
            print(f"batch {batch} {dtype} compile={r['compile']} pack={r['pack']}: decode step {r['step_ms']:.1f} ms "
                  f"({batch / r['step_ms'] * 1e3:.0f} tok/s), profiled {r['profiled_step_ms']:.1f} ms; "
                  f"attention + cache write {attn:.1%}\n    {shares}", flush=True)


if __name__ == "__main__":
    main()
