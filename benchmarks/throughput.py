"""Output throughput of hf_paged against the Hugging Face ways of generating, side by side in one process.

Every engine runs the SAME token-id prompts, generates exactly the same number of new tokens per request
(greedy, EOS never ends a request early), with the same KV memory budget where the engine has one:

  hf-single   HF ``generate``, one request at a time (optionally only the first K prompts; the rate is then
              tokens / time over those K and is labelled "extrapolated").
  hf-static   HF ``generate`` on static batches, left-padded, at several batch sizes. A batch runs until its
              longest request is done; only each request's own tokens count as useful output.
  hf-cb       transformers' own continuous batching (``ContinuousBatchingManager``, what ``generate_batch``
              runs), with explicit ``num_blocks`` (same KV bytes as hf_paged) and ``max_batch_tokens``.
  hf_paged    ``LLMEngine.generate`` on a pool of the same size, prefix caching off unless asked.
  ceiling     one decode forward of the plain HF model (sdpa, DynamicCache prefilled with random K/V to the
              workload's mean decode context) at the batch size hf_paged ran: batch / time.

Each engine is warmed up untimed on the shared warm-up prompts first. Timings are wall clock
(``time.perf_counter``) around the whole generation of the workload, model loading and KV allocation excluded.

    python benchmarks/throughput.py --workload both                # the real measurement (idle machine!)
    python benchmarks/throughput.py --workload both -n 4 --max-new 8 --static-batch-sizes 2,4 --single-limit 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENGINES = ("hf-single", "hf-static", "hf-cb", "hf_paged")
GiB = 1 << 30


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["fixed", "mixed", "both"], default="both")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    ap.add_argument("-n", "--num-prompts", type=int, default=64, help="N requests per workload")
    ap.add_argument("--prompt-len", type=int, default=128, help="fixed workload: tokens per prompt")
    ap.add_argument("--max-new", type=int, default=128,
                    help="M: fixed workload's new tokens per request; the mixed output range scales with M/128")
    ap.add_argument("--mixed-prompt-range", default="20,1000", help="mixed: prompt lengths, uniform in LO,HI")
    ap.add_argument("--mixed-out-range", default=None,
                    help="mixed: output lengths, uniform in LO,HI (default 16,512 scaled by M/128)")
    ap.add_argument("--seed", type=int, default=0, help="mixed workload's seed")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--kv-memory-gb", type=float, default=3.0,
                    help="KV budget in GiB for hf_paged's pool and hf-cb's cache (default 3: mixed N=64 fits)")
    ap.add_argument("--block-size", type=int, default=16, help="hf_paged block size (tokens)")
    ap.add_argument("--max-batched-tokens", type=int, default=2048,
                    help="hf_paged max_num_batched_tokens and hf-cb max_batch_tokens")
    ap.add_argument("--max-num-seqs", type=int, default=256,
                    help="hf_paged max_num_seqs and hf-cb max_requests_per_batch")
    ap.add_argument("--prefix-caching", action="store_true",
                    help="turn on hf_paged's prefix caching (and hf-cb's block sharing); off by default")
    ap.add_argument("--cb-page-size", type=int, default=256, help="hf-cb page size (transformers' default 256)")
    ap.add_argument("--static-batch-sizes", default="8,16,32,64")
    ap.add_argument("--single-limit", type=int, default=8,
                    help="hf-single runs only the first K prompts and extrapolates its rate (0 = all)")
    ap.add_argument("--ceiling-reps", type=int, default=5, help="timed decode forwards for the ceiling (median)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the forward-only ceiling")
    ap.add_argument("--check", action="store_true",
                    help="fixed workload, fp32: assert hf_paged's greedy tokens equal hf-static's")
    ap.add_argument("--json", default=None, help="write every result to this JSON file")
    args = ap.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in args.engines if e not in ENGINES]
    if bad:
        ap.error(f"--engines: unknown {bad}; choose from {ENGINES}")
    args.static_batch_sizes = sorted({int(x) for x in args.static_batch_sizes.split(",") if x.strip()})
    args.mixed_prompt_range = tuple(int(x) for x in args.mixed_prompt_range.split(","))
    if args.mixed_out_range is None:
        scale = args.max_new / 128
        args.mixed_out_range = (max(1, round(16 * scale)), max(1, round(512 * scale)))
    else:
        args.mixed_out_range = tuple(int(x) for x in args.mixed_out_range.split(","))
    if args.check:
        if args.dtype != "float32":
            ap.error("--check compares greedy tokens, which only agree in float32")
        if "hf-static" not in args.engines or "hf_paged" not in args.engines:
            ap.error("--check needs hf-static and hf_paged in --engines")
        if args.workload == "mixed":
            ap.error("--check applies to the fixed workload")
    return args


def _rss_gib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / GiB
    except ImportError:
        return float("nan")


def _release() -> None:
    """Collect garbage and hand freed heap back to the OS, so one engine's buffers do not weigh on the next."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The engines. Each returns a result dict with "tokens" (per request, for --check), "elapsed_s",
# "useful_output_tokens" and "output_tok_per_s".
# ---------------------------------------------------------------------------------------------------------------

def _hf_generate(model, batch: list[list[int]], new_tokens: int, pad_id: int):
    """HF generate on a left-padded batch; returns the new tokens of each row."""
    import torch

    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(batch):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=pad_id)
    return out[:, width:].tolist()


def run_hf_single(model, wl, limit: int, pad_id: int) -> dict:
    import torch

    k = wl.n if limit <= 0 else min(limit, wl.n)
    with torch.inference_mode():
        for p in wl.warmup_prompts:
            _hf_generate(model, [p], 4, pad_id)
        tokens = []
        start = time.perf_counter()
        for p, o in zip(wl.prompts[:k], wl.out_lens[:k]):
            tokens.append(_hf_generate(model, [p], o, pad_id)[0][:o])
        elapsed = time.perf_counter() - start
    useful = sum(wl.out_lens[:k])
    res = {"engine": "hf-single", "prompts_run": k, "elapsed_s": elapsed, "useful_output_tokens": useful,
           "output_tok_per_s": useful / elapsed, "tokens": tokens}
    if k < wl.n:
        res["extrapolated"] = True
        res["extrapolated_full_elapsed_s"] = wl.total_output_tokens / res["output_tok_per_s"]
        res["note"] = f"first {k} of {wl.n} prompts, rate extrapolated"
    else:
        res["note"] = f"all {wl.n} prompts"
    return res


def run_hf_static(model, wl, batch_size: int, pad_id: int, kv_bytes_per_token: int) -> dict:
    import torch

    with torch.inference_mode():
        _hf_generate(model, wl.warmup_prompts, 4, pad_id)
        tokens: list[list[int]] = []
        computed = 0
        peak_kv = 0
        start = time.perf_counter()
        for lo in range(0, wl.n, batch_size):
            prompts = wl.prompts[lo:lo + batch_size]
            outs = wl.out_lens[lo:lo + batch_size]
            steps = max(outs)  # a static batch runs until its longest request is done
            rows = _hf_generate(model, prompts, steps, pad_id)
            tokens.extend(r[:o] for r, o in zip(rows, outs))
            computed += steps * len(prompts)
            peak_kv = max(peak_kv, len(prompts) * (max(len(p) for p in prompts) + steps) * kv_bytes_per_token)
        elapsed = time.perf_counter() - start
    useful = wl.total_output_tokens
    return {"engine": "hf-static", "batch_size": batch_size, "elapsed_s": elapsed,
            "useful_output_tokens": useful, "generated_tokens_incl_padding": computed,
            "output_tok_per_s": useful / elapsed, "dynamic_cache_peak_bytes": peak_kv, "tokens": tokens,
            "note": f"batch size {batch_size}, {computed - useful} padding tokens generated, DynamicCache "
                    f"up to {peak_kv / GiB:.2f} GiB"}


def run_hf_cb(model, wl, args, kv_bytes: int, pad_id: int) -> dict:
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    from hf_paged.admission import kv_geometry

    layers, kv_heads, head_dim = kv_geometry(model.config)
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    block_bytes = layers * 2 * kv_heads * head_dim * itemsize * args.cb_page_size  # one page per layer
    num_blocks = max(1, kv_bytes // block_bytes)
    # eos_token_id=-1: no EOS, every request runs to its own max_new_tokens (= its exact output length).
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max(wl.out_lens), eos_token_id=-1,
                               pad_token_id=pad_id)
    cb_cfg = ContinuousBatchingConfig(page_size=args.cb_page_size, num_blocks=num_blocks,
                                      max_batch_tokens=args.max_batched_tokens,
                                      max_requests_per_batch=args.max_num_seqs,
                                      allow_block_sharing=args.prefix_caching, auto_switch_to_flash=False,
                                      # Only the headroom of transformers' footprint check (on CPU it allows 60%
                                      # of total RAM minus our RSS by default); the sizes above are fixed.
                                      max_memory_percent=0.95)
    hints = WorkloadHints(max_prompt_length=max(wl.prompt_lens), max_generated_length=max(wl.out_lens),
                          num_requests=wl.n)

    def run(prompts, out_lens, prefix):
        ids = [manager.add_request(p, request_id=f"{prefix}{i}", max_new_tokens=o, eos_token_id=-1)
               for i, (p, o) in enumerate(zip(prompts, out_lens))]
        results = {}
        while len(results) < len(ids):
            r = manager.get_result(timeout=1)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError("hf-cb: the generation thread died")
                continue
            if r.is_finished():
                if r.error is not None:
                    raise RuntimeError(f"hf-cb: request {r.request_id} failed: {r.error}")
                results[r.request_id] = r
        return [results[i].generated_tokens for i in ids]

    # The same loop as model.generate_batch, but with a per-request max_new_tokens (the mixed workload) and
    # with the cache allocated once, before the timed run (as hf_paged's pool is).
    manager = model.init_continuous_batching(generation_config=gen_cfg, continuous_batching_config=cb_cfg,
                                             workload_hints=hints)
    try:
        manager.warmup()
        manager.start()
        run(wl.warmup_prompts, [4] * len(wl.warmup_prompts), "warmup-")
        start = time.perf_counter()
        tokens = run(wl.prompts, wl.out_lens, "req-")
        elapsed = time.perf_counter() - start
        cache = manager.batch_processor.cache if manager.batch_processor is not None else None
        cache_bytes = None if cache is None else int(cache.num_sectors * cache.bytes_per_sector)
    finally:
        manager.stop(block=True, timeout=30)
        manager.destroy()
    useful = sum(len(t) for t in tokens)
    if useful != wl.total_output_tokens:
        raise RuntimeError(f"hf-cb produced {useful} tokens, expected {wl.total_output_tokens}")
    return {"engine": "hf-cb", "elapsed_s": elapsed, "useful_output_tokens": useful,
            "output_tok_per_s": useful / elapsed, "tokens": tokens, "num_blocks": num_blocks,
            "page_size": args.cb_page_size, "kv_cache_bytes": cache_bytes,
            "note": f"{num_blocks} pages of {args.cb_page_size} tok ({num_blocks * block_bytes / GiB:.2f} GiB), "
                    f"max_batch_tokens {args.max_batched_tokens}, no EOS"}


def run_hf_paged(engine, wl) -> dict:
    from hf_paged.engine.metrics import EngineMetrics
    from hf_paged.core.sequence import SamplingParams

    def params(o):  # min=max: EOS is banned until the last token, exactly like HF generate's min_new_tokens
        return SamplingParams(max_new_tokens=o, min_new_tokens=o, temperature=0.0)

    engine.generate(wl.warmup_prompts, params(4), use_tqdm=False)
    assert engine.idle()
    engine.metrics = metrics = EngineMetrics()
    steps: list[tuple[int, int, bool, float]] = []  # (seqs, tokens, decode-only, seconds)
    record = metrics.record_step

    def record_step(num_tokens, seconds, pool, scheduler):
        counts = scheduler.step_counts  # the step's new tokens per sequence
        steps.append((len(counts), num_tokens, all(n == 1 for n in counts), seconds))
        record(num_tokens, seconds, pool, scheduler)

    metrics.record_step = record_step
    start = time.perf_counter()
    outs = engine.generate(wl.prompts, [params(o) for o in wl.out_lens], use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = [list(o.token_ids) for o in outs]
    useful = sum(len(t) for t in tokens)
    if useful != wl.total_output_tokens:
        raise RuntimeError(f"hf_paged produced {useful} tokens, expected {wl.total_output_tokens}")
    summary = metrics.summary()
    decode = [s for s in steps if s[2]]
    decode_tokens = sum(s[0] for s in decode)
    decode_time = sum(s[3] for s in decode)
    max_batch = max(s[0] for s in steps)
    return {"engine": "hf_paged", "elapsed_s": elapsed, "useful_output_tokens": useful,
            "output_tok_per_s": useful / elapsed, "tokens": tokens, "metrics": summary,
            "pool_blocks": engine.pool.num_blocks, "block_size": engine.pool.block_size,
            "pool_bytes": engine.pool.num_blocks * engine.kv_cache.bytes_per_block,
            "max_concurrent_seqs": max_batch, "steps": len(steps), "step_time_s": sum(s[3] for s in steps),
            "decode_only_steps": len(decode), "decode_only_tokens": decode_tokens,
            "decode_only_time_s": decode_time,
            "decode_step_tok_per_s": decode_tokens / decode_time if decode_time else None,
            "decode_mean_batch": decode_tokens / len(decode) if decode else None,
            "note": f"peak KV util {summary['kv_slot_utilization_at_peak']:.3f}, peak blocks "
                    f"{summary['peak_blocks_in_use']}/{engine.pool.num_blocks}, preemptions "
                    f"{summary['preemptions']}, max batch {max_batch}"}


def forward_ceiling(model, batch: int, context: int, reps: int) -> dict:
    """Median time of one decode forward of the plain HF model (sdpa + DynamicCache of `context` tokens)."""
    import torch
    from transformers import DynamicCache

    from hf_paged.admission import kv_geometry

    layers, kv_heads, head_dim = kv_geometry(model.config)
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(batch, kv_heads, context, head_dim, generator=gen).to(model.dtype)
    values = torch.randn(batch, kv_heads, context, head_dim, generator=gen).to(model.dtype)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (batch, 1), generator=gen)
    pos = torch.full((batch, 1), context, dtype=torch.long)
    mask = torch.ones(batch, context + 1, dtype=torch.long)
    times = []
    with torch.inference_mode():
        for i in range(2 + reps):
            cache = DynamicCache(config=model.config)
            for layer in range(layers):
                cache.update(keys, values, layer)
            start = time.perf_counter()
            model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True)
            if i >= 2:
                times.append(time.perf_counter() - start)
            del cache
    t = statistics.median(times)
    return {"engine": "ceiling", "batch": batch, "context": context, "forward_s_median": t,
            "forward_s_all": times, "output_tok_per_s": batch / t,
            "note": f"1 decode forward, batch {batch}, ctx {context}, HF sdpa + DynamicCache (median of {reps})"}


# ---------------------------------------------------------------------------------------------------------------

def compare_tokens(name: str, ref: list[list[int]], got: list[list[int]]) -> dict:
    n = min(len(ref), len(got))
    bad = [i for i in range(n) if ref[i] != got[i]]
    first = None
    if bad:
        i = bad[0]
        pos = next((j for j, (a, b) in enumerate(zip(ref[i], got[i])) if a != b), min(len(ref[i]), len(got[i])))
        first = {"request": i, "position": pos, "ref": ref[i][pos:pos + 5], "hf_paged": got[i][pos:pos + 5]}
    return {"against": name, "compared": n, "mismatched": len(bad), "first_mismatch": first}


def init_torch(threads: int | None):
    """Thread counts set before torch starts its pools (so every thread, engine threads included, gets them) and
    transformers quiet; returns (torch, transformers)."""
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    return torch, transformers


def main(argv=None) -> int:
    args = parse_args(argv)
    torch, transformers = init_torch(args.threads)

    from benchmarks.workloads import fixed_workload, mixed_workload
    from hf_paged.admission import kv_geometry
    from hf_paged.engine.llm_engine import LLMEngine
    from hf_paged.models import load_default_model

    dtype = getattr(torch, args.dtype)
    kv_bytes = int(args.kv_memory_gb * GiB)

    def load():
        model, tok = load_default_model(dtype, attn_implementation="sdpa")
        model.generation_config.pad_token_id = model.generation_config.pad_token_id or tok.eos_token_id
        return model, tok

    base_model, tokenizer = load()
    pad_id = base_model.generation_config.pad_token_id
    layers, kv_heads, head_dim = kv_geometry(base_model.config)
    kv_bytes_per_token = 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    workloads = []
    if args.workload in ("fixed", "both"):
        workloads.append(fixed_workload(tokenizer, args.num_prompts, args.prompt_len, args.max_new))
    if args.workload in ("mixed", "both"):
        workloads.append(mixed_workload(tokenizer, args.num_prompts, args.seed, args.mixed_prompt_range,
                                        args.mixed_out_range))

    env = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "dtype": args.dtype, "kv_budget_bytes": kv_bytes, "kv_bytes_per_token": kv_bytes_per_token,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    log(f"torch {env['torch']}, transformers {env['transformers']}, {env['torch_threads']} threads, {args.dtype}, "
        f"KV budget {kv_bytes / GiB:.2f} GiB = {kv_bytes // kv_bytes_per_token} tokens")

    paged_model = cb_model = engine = None
    all_results: list[dict] = []
    checks: list[dict] = []
    check_failed = False

    for wl in workloads:
        worst = sum(len(p) + o for p, o in zip(wl.prompts, wl.out_lens)) * kv_bytes_per_token
        log(f"workload {wl.name}: {wl.description}; all requests at full length would need "
            f"{worst / GiB:.2f} GiB of KV ({'fits' if worst <= kv_bytes else 'exceeds'} the budget)")
        res: dict[str, list[dict]] = {}

        def add(r):
            r.update(workload=wl.name, dtype=args.dtype)
            res.setdefault(r["engine"], []).append(r)
            extra = ""
            if r["engine"] == "hf_paged" and r.get("decode_step_tok_per_s"):
                extra = f", decode-only steps {r['decode_step_tok_per_s']:.1f} tok/s"
            _release()
            r["rss_gib_after"] = round(_rss_gib(), 2)
            log(f"  {r['engine']:<10} {r['output_tok_per_s']:9.1f} tok/s  ({r['elapsed_s'] if 'elapsed_s' in r else r['forward_s_median']:.2f} s; "
                f"{r['note']}{extra}; RSS {r['rss_gib_after']:.1f} GiB)")

        for name in args.engines:
            if name == "hf-single":
                add(run_hf_single(base_model, wl, args.single_limit, pad_id))
            elif name == "hf-static":
                for bs in sorted({min(b, wl.n) for b in args.static_batch_sizes}):
                    add(run_hf_static(base_model, wl, bs, pad_id, kv_bytes_per_token))
            elif name == "hf-cb":
                if cb_model is None:
                    cb_model, _ = load()
                add(run_hf_cb(cb_model, wl, args, kv_bytes, pad_id))
            elif name == "hf_paged":
                if engine is None:
                    paged_model, _ = load()
                    # No tokenizer: outputs stay token ids, as for every other engine here (no detokenizing).
                    engine = LLMEngine(paged_model, None, block_size=args.block_size, memory_bytes=kv_bytes,
                                       max_num_seqs=args.max_num_seqs,
                                       max_num_batched_tokens=args.max_batched_tokens,
                                       enable_prefix_caching=args.prefix_caching)
                add(run_hf_paged(engine, wl))

        if not args.no_ceiling:
            batch = res["hf_paged"][0]["max_concurrent_seqs"] if "hf_paged" in res else min(wl.n, args.max_num_seqs)
            add(forward_ceiling(base_model, batch, round(wl.mean_decode_context), args.ceiling_reps))

        if args.check and wl.name == "fixed":
            paged_tokens = res["hf_paged"][0]["tokens"]
            for r in res.get("hf-static", []):
                c = compare_tokens(f"hf-static bs={r['batch_size']}", r["tokens"], paged_tokens)
                c["required"] = True
                checks.append(c)
                check_failed |= c["mismatched"] > 0
            for r in res.get("hf-single", []):
                checks.append({**compare_tokens("hf-single", r["tokens"], paged_tokens), "required": False})
            for r in res.get("hf-cb", []):  # hf-cb does not ban EOS before the last token: informative only
                checks.append({**compare_tokens("hf-cb", r["tokens"], paged_tokens), "required": False})

        paged_rate = res["hf_paged"][0]["output_tok_per_s"] if "hf_paged" in res else None
        if "hf-static" in res:
            best = max(res["hf-static"], key=lambda r: r["output_tok_per_s"])
            best["best_static"] = True
        for rows in res.values():
            for r in rows:
                r["hf_paged_over_this"] = paged_rate / r["output_tok_per_s"] if paged_rate else None
                all_results.append(r)
        all_results.append({"engine": "_workload", **wl.summary()})

    # ---- the final table -------------------------------------------------------------------------------------
    print()
    print("output tok/s = useful output tokens / wall time; 'hf_paged/x' = hf_paged's tok/s divided by the row's "
          "(>1: hf_paged is faster; on the ceiling row, the fraction of the forward-only ceiling hf_paged reaches)")
    header = f"{'engine':<22} {'workload':<8} {'dtype':<9} {'out tok/s':>10} {'hf_paged/x':>10}  notes"
    print(header)
    print("-" * len(header))
    for r in all_results:
        if r["engine"] == "_workload":
            continue
        name = r["engine"]
        if name == "hf-static":
            name += f" bs={r['batch_size']}" + (" *best" if r.get("best_static") else "")
        ratio = f"{r['hf_paged_over_this']:.2f}x" if r.get("hf_paged_over_this") else "-"
        print(f"{name:<22} {r['workload']:<8} {r['dtype']:<9} {r['output_tok_per_s']:>10.1f} {ratio:>10}  {r['note']}")
        if r["engine"] == "hf_paged" and r.get("decode_step_tok_per_s"):
            ceiling = next((c for c in all_results if c["engine"] == "ceiling" and c["workload"] == r["workload"]),
                           None)
            vs = f"{r['decode_step_tok_per_s'] / ceiling['output_tok_per_s']:.2f}x" if ceiling else "-"
            print(f"{'  hf_paged decode steps':<22} {r['workload']:<8} {r['dtype']:<9} "
                  f"{r['decode_step_tok_per_s']:>10.1f} {'':>10}  forward+sample time of the "
                  f"{r['decode_only_steps']} all-decode steps (scheduling excluded), mean batch "
                  f"{r['decode_mean_batch']:.1f}; {vs} of the ceiling")
    for r in all_results:
        if r["engine"] == "hf_paged":
            m = r["metrics"]
            print(f"hf_paged {r['workload']}: peak KV slot utilisation {m['kv_slot_utilization_at_peak']:.3f}, "
                  f"peak blocks {m['peak_blocks_in_use']}/{r['pool_blocks']} (block {r['block_size']}), "
                  f"preemptions {m['preemptions']}, steps {r['steps']}, mean TTFT {m['mean_ttft_s']:.2f} s, "
                  f"mean TPOT {m['mean_tpot_s'] * 1000:.1f} ms")
        if r["engine"] == "hf-single" and r.get("extrapolated"):
            print(f"hf-single {r['workload']}: ran {r['prompts_run']} of the workload's prompts; the full workload "
                  f"would take ~{r['extrapolated_full_elapsed_s']:.0f} s at that rate (extrapolated)")
    for c in checks:
        status = "OK" if c["mismatched"] == 0 else ("FAIL" if c["required"] else "differs (informative)")
        print(f"check hf_paged vs {c['against']}: {c['compared'] - c['mismatched']}/{c['compared']} identical "
              f"-> {status}" + (f"; first mismatch {c['first_mismatch']}" if c["first_mismatch"] else ""))

    if args.json:
        dump = {"args": {k: v for k, v in vars(args).items()}, "env": env, "checks": checks,
                "results": [{k: v for k, v in r.items() if k != "tokens"} for r in all_results]}
        Path(args.json).write_text(json.dumps(dump, indent=2, default=str))
        log(f"wrote {args.json}")
    if check_failed:
        print("CHECK FAILED: hf_paged's greedy tokens differ from hf-static's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
