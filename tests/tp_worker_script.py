"""What ``tests/test_tensor_parallel.py`` runs under ``torchrun --nproc-per-node 2`` (gloo, CPU): a tiny model loaded
with transformers' tensor parallelism, rank 0 running hf_paged engines on it and the other rank the worker loop.

The scenarios are plain data and one function (:func:`run_scenario`), so the test runs the very same requests on the
unsharded model in a single process as the oracle. Rank 0 writes one JSON file: each scenario's tokens and counters,
the per-rank KV cache sizes and shapes, what the workers report (steps, forward tokens, engines open, KV bytes; only
rank 0 counts blocks), and optionally the result of an SPMD ``wrap``-ed ``generate`` call and of a rank that dies
mid-run.

    torchrun --nproc-per-node 2 tests/tp_worker_script.py MODEL_DIR OUT.json [--spmd] [--dead-rank]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import threading
import time
from typing import Any

import torch

PREFIX = list(range(100, 140))  # 40 tokens shared by the prefix-caching prompts (10 full blocks of 4)


def prompts(n: int, seed: int, low: int = 3, high: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(3, 256, (length,), generator=g).tolist() for length in lengths]


# name -> (engine options, request batches run one after the other, sampling options)
SCENARIOS: dict[str, dict[str, Any]] = {
    "greedy": dict(engine=dict(num_blocks=64, block_size=4), batches=[prompts(6, 0)],
                   params=dict(max_new_tokens=16, temperature=0.0)),
    "chunked_prefill": dict(engine=dict(num_blocks=64, block_size=4, max_num_batched_tokens=16),
                            batches=[prompts(5, 1, 20, 40)], params=dict(max_new_tokens=12, temperature=0.0)),
    "preemption": dict(engine=dict(num_blocks=16, block_size=4), batches=[prompts(6, 2, 20, 36)],
                       params=dict(max_new_tokens=16, temperature=0.0)),
    "prefix_caching": dict(engine=dict(num_blocks=96, block_size=4, enable_prefix_caching=True),
                           batches=[[PREFIX + p for p in prompts(3, 3, 2, 9)], [PREFIX + p for p in prompts(3, 4, 2, 9)]],
                           params=dict(max_new_tokens=10, temperature=0.0)),
    "n2_sampling": dict(engine=dict(num_blocks=64, block_size=4), batches=[prompts(3, 5, 5, 15)],
                        params=dict(max_new_tokens=10, temperature=0.8, n=2, seed=7)),
    "beams": dict(engine=dict(num_blocks=64, block_size=4), batches=[prompts(2, 6, 5, 15)],
                  params=dict(max_new_tokens=8, num_beams=2, temperature=0.0)),
    # Prompt lookup on prompts that repeat themselves: steps of drafts verified as chunks, slots rolled back.
    "speculative": dict(engine=dict(num_blocks=64, block_size=4, speculative={"method": "ngram", "num_tokens": 4,
                                                                              "adaptive": False}),
                        batches=[[p * 3 for p in prompts(4, 9, 4, 8)]], params=dict(max_new_tokens=16,
                                                                                    temperature=0.0)),
}
ABORT = dict(engine=dict(num_blocks=24, block_size=4), long=prompts(1, 7, 10, 11)[0], long_tokens=80,
             abort_after=6, then=prompts(4, 8, 20, 30), params=dict(max_new_tokens=30, temperature=0.0))
SPMD_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]  # left-padded into one batch for model.generate
SPMD_NEW_TOKENS = 10


def run_scenario(model: Any, name: str) -> dict[str, Any]:
    """One scenario on a fresh engine: every output's tokens (samples and beams flattened), plus counters."""
    from hf_paged import LLMEngine, SamplingParams

    spec = SCENARIOS[name]
    with LLMEngine(model, **spec["engine"]) as engine:
        outputs: list[list[int]] = []
        for batch in spec["batches"]:
            for out in engine.generate(batch, SamplingParams(**spec["params"]), use_tqdm=False):
                if out.error is not None:
                    raise RuntimeError(f"{name}: {out.error}")
                outputs.extend([s.token_ids for s in out.samples] if out.samples else [out.token_ids])
        stats = engine.stats()
        return {"tokens": outputs, "preemptions": engine.metrics.preemptions,
                "prefix_cache_hits": stats["prefix_cache_hits"], "used_blocks_after": engine.pool.num_used_blocks,
                "accepted_drafts": stats.get("spec_decode_num_accepted_tokens", 0),
                "forward_tokens": engine.runner.num_forward_tokens, "kv_bytes": engine.kv_cache.nbytes,
                "kv_shape": list(engine.kv_cache.kv.shape), "num_blocks": engine.pool.num_blocks}


def run_abort(model: Any) -> dict[str, Any]:
    """A long request aborted mid-run on rank 0, then requests that need the whole pool (they reuse its blocks)."""
    from hf_paged import FinishReason, LLMEngine, SamplingParams

    with LLMEngine(model, **ABORT["engine"]) as engine:
        seq = engine.submit(ABORT["long"], SamplingParams(max_new_tokens=ABORT["long_tokens"], temperature=0.0,
                                                          ignore_eos=True), stream=True)
        seen = 0
        while seen < ABORT["abort_after"]:
            seen += len(seq.stream.get(timeout=60).token_ids)
        engine.abort(seq.request_id)
        if not seq.done.wait(60):
            raise RuntimeError("abort: the aborted request never finished")
        used_after_abort = engine.pool.num_used_blocks
        outs = engine.generate(ABORT["then"], SamplingParams(**ABORT["params"]), use_tqdm=False)
        return {"aborted": seq.finish_reason == FinishReason.ABORT, "aborted_tokens": seq.num_output_tokens,
                "used_blocks_after_abort": used_after_abort, "tokens": [o.token_ids for o in outs],
                "used_blocks_after": engine.pool.num_used_blocks, "forward_tokens": engine.runner.num_forward_tokens}


def spmd_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in SPMD_PROMPTS)
    ids = torch.zeros(len(SPMD_PROMPTS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(SPMD_PROMPTS):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _die_mid_engine(stats, dead_engine: int) -> None:
    """Exit this rank a few steps into its ``dead_engine``-th engine, as a crashed worker would (exit code 0:
    torchrun would otherwise tear rank 0 down before it can report)."""
    while stats.engines_started < dead_engine:
        time.sleep(0.001)
    first = stats.steps
    while stats.steps < first + 3:
        time.sleep(0.001)
    os._exit(0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--scenarios", default=",".join(list(SCENARIOS) + ["abort"]))
    parser.add_argument("--spmd", action="store_true", help="then every rank calls a wrap-ed model.generate")
    parser.add_argument("--dead-rank", action="store_true", help="last: rank 1 exits in the middle of a run")
    parser.add_argument("--watchdog", type=float, default=120.0,
                        help="seconds after which a hung rank prints every thread's stack and exits")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.watchdog, exit=True)

    import torch.distributed as dist

    import hf_paged
    from hf_paged import distributed as tp

    tp.init_tensor_parallel(timeout=__import__("datetime").timedelta(seconds=60))
    model = tp.load_tensor_parallel(args.model_dir, torch.float32)
    names = [n for n in args.scenarios.split(",") if n]
    rank = tp.rank()
    result: dict[str, Any] = {"world_size": tp.world_size(), "scenarios": {}}

    if rank != 0:
        dead_engine = len(names) + 1 if args.dead_rank else None  # the engine started after the others
        worker = tp.worker_for(model)
        if dead_engine is not None:
            threading.Thread(target=_die_mid_engine, args=(worker.stats, dead_engine), daemon=True).start()
        tp.worker_loop(model)
        if args.spmd:
            hf_paged.wrap(model, num_blocks=64, block_size=4)
            ids, mask = spmd_inputs()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=SPMD_NEW_TOKENS, do_sample=False)
            with open(f"{args.out}.rank1", "w") as f:
                json.dump({"spmd_sequences": out.tolist()}, f)
            hf_paged.unwrap(model)
        dist.destroy_process_group()
        return 0

    started = time.perf_counter()
    result["scenario_seconds"] = {}
    for name in names:
        began = time.perf_counter()
        result["scenarios"][name] = run_abort(model) if name == "abort" else run_scenario(model, name)
        result["scenario_seconds"][name] = round(time.perf_counter() - began, 2)
    result["workers"] = tp.worker_reports()
    result["rank0_forward_tokens"] = sum(s["forward_tokens"] for s in result["scenarios"].values())
    if args.dead_rank:
        from hf_paged import LLMEngine, SamplingParams

        engine = LLMEngine(model, num_blocks=64, block_size=4)
        began = time.perf_counter()
        seqs = [engine.submit(p, SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True))
                for p in prompts(3, 9)]
        finished = all(s.done.wait(120) for s in seqs)
        errors = [f"{type(s.error).__name__}: {s.error}" if s.error else None for s in seqs]
        later = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=4))
        later.done.wait(60)
        result["dead_rank"] = {"finished": finished, "seconds": round(time.perf_counter() - began, 2),
                               "errors": errors, "tokens_before_error": [s.num_output_tokens for s in seqs],
                               "later_error": f"{type(later.error).__name__}: {later.error}" if later.error else None,
                               "used_blocks_after": engine.pool.num_used_blocks}
        engine.close()
    else:
        tp.stop_workers()
    if args.spmd:
        hf_paged.wrap(model, num_blocks=64, block_size=4)
        ids, mask = spmd_inputs()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=SPMD_NEW_TOKENS, do_sample=False)
        result["spmd_sequences"] = out.tolist()
        hf_paged.unwrap(model)
    result["seconds"] = round(time.perf_counter() - started, 2)
    with open(args.out, "w") as f:
        json.dump(result, f)
    if not args.dead_rank:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
