"""Where an engine run's time goes: one workload through ``LLMEngine.generate`` (the engine thread, as in
``vs_vllm.py``), its forward time split into steps that prefill and decode-only steps, and the paged attention
time split by kind (decode, whole prompts, later chunks of prompts).

    benchmarks/step_breakdown.py [--workload fixed|mixed] [--dtype bfloat16] [-n 32] [--compile]

The attention timer wraps the PyTorch/CPU ``paged_attention`` entry (its own overhead is ~1 us a layer).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="fixed", choices=["fixed", "mixed"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("-n", "--num-prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--max-batched-tokens", type=int, default=2048, help="the step's token budget")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from hf_paged import LLMEngine, SamplingParams
    from hf_paged.kernels import dispatch
    from hf_paged.models import load_default_model
    from workloads import fixed_workload, mixed_workload

    model, tok = load_default_model(dtype=getattr(torch, args.dtype))
    start = time.perf_counter()
    engine = LLMEngine(model, tok, memory_bytes=3 << 30, enable_prefix_caching=False, compile=args.compile,
                       max_num_batched_tokens=args.max_batched_tokens)
    wl = (fixed_workload(tok, args.num_prompts, 128, 128) if args.workload == "fixed"
          else mixed_workload(tok, args.num_prompts, 0, (20, 1000), (16, 512)))

    def params(m: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=m, min_new_tokens=m, temperature=0.0)

    engine.generate(wl.warmup_prompts, params(4), use_tqdm=False)
    engine.generate(wl.warmup_prompts[:1], params(4), use_tqdm=False)
    startup_s = time.perf_counter() - start

    steps: list[tuple[float, bool]] = []  # (seconds, prefills)
    execute = engine.runner.execute

    def timed_execute(step):
        t = time.perf_counter()
        out = execute(step)
        steps.append((time.perf_counter() - t, any(n > 1 or s.num_computed_tokens == 0
                                                   for s, n in zip(step.seqs, step.num_new_tokens))))
        return out

    attention: dict[str, float] = defaultdict(float)
    attend = dispatch._torch_attention.paged_attention

    def timed_attention(query, key_cache, value_cache, meta, *rest, **kw):
        t = time.perf_counter()
        out = attend(query, key_cache, value_cache, meta, *rest, **kw)
        prompts = list(zip(meta.q_lens_list[meta.num_decodes:], meta.kv_lens_list[meta.num_decodes:]))
        kind = "decode only" if not prompts else ("with prompt chunks" if any(q < kv for q, kv in prompts)
                                                 else "with whole prompts")
        attention[kind] += time.perf_counter() - t
        return out

    engine.runner.execute = timed_execute
    dispatch._torch_attention.paged_attention = timed_attention
    try:
        start = time.perf_counter()
        outs = engine.generate(wl.prompts, [params(m) for m in wl.out_lens], use_tqdm=False)
        elapsed = time.perf_counter() - start
    finally:
        dispatch._torch_attention.paged_attention = attend
    produced = sum(len(o.token_ids) for o in outs)
    prefill = [s for s, p in steps if p]
    decode = [s for s, p in steps if not p]
    print(f"{args.workload} {args.dtype} compile={args.compile}: {produced / elapsed:.1f} output tok/s, "
          f"{elapsed:.2f} s (start-up incl. warm-up {startup_s:.1f} s)")
    print(f"  steps with prefill: {len(prefill)}, {sum(prefill):.2f} s")
    per_step = 1e3 * sum(decode) / max(len(decode), 1)
    print(f"  decode-only steps:  {len(decode)}, {sum(decode):.2f} s ({per_step:.1f} ms each)")
    print(f"  outside forwards:   {elapsed - sum(prefill) - sum(decode):.2f} s")
    print("  attention (steps " + ", ".join(f"{k}: {v:.2f} s" for k, v in sorted(attention.items())) + ")")


if __name__ == "__main__":
    main()
