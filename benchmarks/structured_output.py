"""Structured output's cost per engine step: a batch of 32 requests, all free, against the same batch with 8 of them
constrained (a JSON schema), side by side in one run on the embedded model.

    benchmarks/structured_output.py [--rows 32] [--constrained 8] [--new 64] [--dtype float32] [--repeats 3]

Each request generates exactly ``--new`` tokens (EOS ignored; the constrained requests' schema is an object with a
long free-text field, so no grammar completes before that), greedy, prefix caching off. Prints the mean step time of
each run (``engine.metrics``: schedule, forward, masks, sampling, append), the share of it spent filling and
applying the masks (timed around ``GrammarCompiler.mask_rows``), and the ratio; best of ``--repeats`` runs each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"},
                                           "summary": {"type": "string", "minLength": 2000}},
          "required": ["title", "year", "summary"], "additionalProperties": False}


def run(engine, prompts, params) -> tuple[float, float, int]:
    """(mean step seconds, mask seconds per step, steps) of one generate call."""
    from hf_paged.core.structured_output import GrammarCompiler

    masked = [0.0]
    original = GrammarCompiler.mask_rows

    def timed(self, *args):
        start = time.perf_counter()
        original(self, *args)
        masked[0] += time.perf_counter() - start

    GrammarCompiler.mask_rows = timed
    try:
        steps, seconds = engine.metrics.steps, engine.metrics.step_time_s
        engine.generate(prompts, params, use_tqdm=False)
        steps, seconds = engine.metrics.steps - steps, engine.metrics.step_time_s - seconds
    finally:
        GrammarCompiler.mask_rows = original
    return seconds / steps, masked[0] / steps, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--constrained", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from hf_paged import LLMEngine, SamplingParams, StructuredOutputs
    from hf_paged.models import default_model_dir, load_default_model
    from workloads import fixed_workload

    torch.set_num_threads(2)
    model, _ = load_default_model(dtype=getattr(torch, args.dtype))
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    prompts = fixed_workload(tok, args.rows, 128, args.new).prompts
    free = SamplingParams(max_new_tokens=args.new, min_new_tokens=args.new, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_new_tokens=args.new, min_new_tokens=args.new, temperature=0, ignore_eos=True,
                                 structured_outputs=StructuredOutputs(json=SCHEMA))
    mixed = [constrained] * args.constrained + [free] * (args.rows - args.constrained)
    with torch.inference_mode(), LLMEngine(model, tok, enable_prefix_caching=False) as engine:
        engine.generate(prompts[:4], [constrained, free, free, free], use_tqdm=False)  # warm up (tokenizer built)
        best = {"free": (float("inf"), 0.0, 0), "mixed": (float("inf"), 0.0, 0)}
        for _ in range(args.repeats):
            for name, params in (("free", [free] * args.rows), ("mixed", mixed)):
                result = run(engine, prompts, params)
                best[name] = min(best[name], result)
    (free_s, _, steps), (mixed_s, mask_s, _) = best["free"], best["mixed"]
    print(f"\n{args.rows} rows ({args.constrained} constrained by a JSON schema), {args.new} new tokens each, "
          f"{args.dtype}, {steps} steps, best of {args.repeats}")
    print("| batch | mean step (ms) | masks per step (ms) | vs all free |\n|---|---:|---:|---:|")
    print(f"| all free | {free_s * 1e3:.2f} | - | 1.00x |")
    print(f"| {args.constrained} constrained | {mixed_s * 1e3:.2f} | {mask_s * 1e3:.2f} "
          f"({100 * mask_s / mixed_s:.1f}% of the step) | {mixed_s / free_s:.3f}x |")


if __name__ == "__main__":
    main()
