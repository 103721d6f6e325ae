"""Runs prompts (a JSON file of prompt token ids) through vLLM's CPU build with and without its n-gram speculation
and prints one ``RESULT {json}`` line per setting; executed by ``speculative.py`` with the vLLM venv's Python, needs
nothing from hf_paged. Greedy, ``max_new`` tokens at most (requests stop at EOS, as the engine's do), ``batch``
requests in flight (``max_num_seqs``). A setting vLLM refuses prints ``RESULT`` with its ``error``."""

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--max-new", type=int, required=True)
    ap.add_argument("-k", type=int, required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) for p in json.load(open(args.prompts))]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new, detokenize=False)
    settings = [("vllm-plain", None), ("vllm-ngram", {"method": "ngram", "num_speculative_tokens": args.k,
                                                      "prompt_lookup_min": 1, "prompt_lookup_max": 3})]
    for name, spec in settings:
        try:
            llm = LLM(model=args.model, dtype=args.dtype, max_model_len=2048, max_num_seqs=args.batch, seed=0,
                      enable_prefix_caching=False, speculative_config=spec)
            llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            tokens = [list(o.outputs[0].token_ids) for o in outs]
            produced = sum(len(t) for t in tokens)
            result = {"method": name, "tokens": produced, "seconds": elapsed, "tok_s": produced / elapsed,
                      "outputs": tokens}
            del llm
        except Exception as exc:  # e.g. speculation not supported on this build
            result = {"method": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
