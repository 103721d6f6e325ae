"""How far prompt lookup can take the grounded workload at a batch size: the engine's greedy outputs replayed under
the step costs measured on this machine, for drafting policies from the best possible down to the engine's own.

    python benchmarks/spec_bounds.py [--batch 4] [--requests 16] [--max-new 128] [-k 10] [--dtype float32]

1. Runs the grounded workload of ``speculative.py`` on the engine without speculation (its greedy outputs are what
   any exact speculation must produce), then with prompt lookup, timing every forward by its number of rows: a
   least-squares line through the forwards of ``batch`` to ``batch * (1 + k)`` rows gives a step's base cost and
   what each verified row adds.
2. Replays decoding of those outputs ``batch`` requests at a time (a finished request's place taken by the next),
   prompt lookup (``ngram_match``) drafting at each step, under that cost line, and prints tokens/s against no
   speculation for: the **oracle** (drafts exactly the tokens that will be accepted: no policy does better with these
   drafts), fixed k, the best **per match-length class** policy (each class's empirical chance that the j-th token is
   accepted, in-sample, against the best threshold: an optimistic bound for any policy that sees only the match) and
   the engine's ``SpeculationController`` (fed the replay's steps); over all decode steps, and over those that ran
   a full batch (``speculative.py``'s full column). Two more rows verify a second candidate beside each draft (the
   latest earlier continuation starting with another token: a two-branch tree, not built in the engine), trimmed by
   the oracle and at fixed lengths: what better candidates, rather than a better policy, could add.

Verification-side costs (sampling, appending) are left out of the replay, so the engine's measured ratio
(``speculative.py``'s decode column) sits somewhat below its replayed one.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from hf_paged import LLMEngine, SamplingParams  # noqa: E402
from hf_paged.core.spec_decode import SpeculationController, ngram_match  # noqa: E402
from hf_paged.models import load_default_model  # noqa: E402
from speculative import prompts  # noqa: E402


def outputs_and_costs(model, tok, ids, batch, max_new, k) -> tuple[list[list[int]], float, float]:
    """(greedy outputs; a step's base seconds at ``batch`` rows; seconds per further row), from the engine."""
    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    with LLMEngine(model, tok, num_blocks=4096, max_num_seqs=batch, enable_prefix_caching=False) as engine:
        outs = [o.token_ids for o in engine.generate(ids, params, use_tqdm=False)]
    times: dict[int, list[float]] = defaultdict(list)
    with LLMEngine(model, tok, num_blocks=4096, max_num_seqs=batch, enable_prefix_caching=False,
                   speculative={"method": "ngram", "num_tokens": k}) as engine:
        forward = engine.runner.model.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            times[kwargs["input_ids"].shape[1]].append(time.perf_counter() - start)
            return out

        engine.runner.model.forward = timed
        engine.generate(ids, params, use_tqdm=False)
    # Medians per row count, batch .. batch * (1 + k) rows (decodes and verifications; prompts are longer).
    points = [(t, sorted(v)[len(v) // 2]) for t, v in times.items() if batch <= t <= batch * (1 + k) and len(v) >= 3]
    n = len(points)
    mean_t, mean_s = sum(t for t, _ in points) / n, sum(s for _, s in points) / n
    slope = sum((t - mean_t) * (s - mean_s) for t, s in points) / sum((t - mean_t) ** 2 for t, _ in points)
    return outs, mean_s + slope * (batch - mean_t), slope


def second_candidate(tokens: list[int], first: list[int], k: int, max_n: int = 3) -> list[int]:
    """Up to ``k`` tokens after the latest earlier occurrence of the longest suffix (``max_n`` tokens or fewer) whose
    continuation starts with another token than ``first`` does: a second branch beside prompt lookup's draft."""
    for n in range(min(max_n, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        starts = [s for s in range(len(tokens) - 1, n - 1, -1) if tokens[s - n:s] == suffix]
        if starts:
            for s in starts:
                if not first or tokens[s] != first[0]:
                    return tokens[s:s + k]
            return []
    return []


def accepted_length(draft: list[int], rest: list[int]) -> int:
    """How many of ``draft`` greedy verification accepts, ``rest`` being the tokens decoding produces."""
    a = 0
    while a < len(draft) and a < len(rest) - 1 and draft[a] == rest[a]:
        a += 1
    return a


def replay(reqs, batch, k, base, per_row, policy=None, controller=None, branch=None) -> tuple[float, float]:
    """Tokens/s of decoding ``reqs`` (prompt, output) ``batch`` at a time, ``policy(draft, match, accepted)`` or the
    controller choosing each draft's length: over all steps, and over the steps that ran a full batch. With
    ``branch(draft, accepted)``, a second branch (``second_candidate``) of that length is verified beside the first
    (a two-branch tree: both branches' rows are paid for, the longer accepted run is kept)."""
    queue, live, pos, seqs = list(range(len(reqs))), [], {}, {}
    seconds = tokens = full_seconds = full_tokens = 0.0
    while queue or live:
        while queue and len(live) < batch:
            i = queue.pop(0)
            live.append(i)
            pos[i] = 0
            seqs[i] = types.SimpleNamespace(spec_match=0, spec_hits=[0.0, 0.0], spec_trials=[0.0, 0.0])
        drafts, accepted, extra_rows, extra_accepted = [], [], 0, []
        for i in live:
            prompt, out = reqs[i]
            draft, match = ngram_match(prompt + out[:pos[i]], k, 1, 3)
            a = accepted_length(draft, out[pos[i]:])
            seqs[i].spec_match = match
            drafts.append(draft)
            accepted.append(a)
            if branch is not None:
                other = second_candidate(prompt + out[:pos[i]], draft, k)
                b = accepted_length(other, out[pos[i]:])
                kb = min(branch(other, b), len(other))
                extra_rows += kb
                extra_accepted.append(min(b, kb))
        if controller is not None:
            cand = [j for j, d in enumerate(drafts) if d]
            ks = [0] * len(live)
            if cand:
                chosen = controller.plan([seqs[live[j]] for j in cand], [len(drafts[j]) for j in cand], len(live),
                                         [True] * len(cand))
                controller.forget([seqs[live[j]] for j in cand])
                for j, n in zip(cand, chosen):
                    ks[j] = n
        else:
            ks = [min(policy(d, seqs[i].spec_match, a), len(d)) for i, d, a in zip(live, drafts, accepted)]
        step, stepping = base + per_row * (sum(ks) + extra_rows), len(live)
        seconds += step
        appended = 0
        for j, i in enumerate(list(live)):
            gained = 1 + max(min(accepted[j], ks[j]), extra_accepted[j] if extra_accepted else 0)
            if controller is not None and ks[j]:
                controller.record_verified(seqs[i], ks[j], gained - 1)
            pos[i] += gained
            appended += gained
            if pos[i] >= len(reqs[i][1]):
                live.remove(i)
        tokens += appended
        if stepping == batch:
            full_seconds += step
            full_tokens += appended
        if controller is not None:
            controller.record_step(stepping, appended, step, sum(ks))
    return tokens / seconds, full_tokens / full_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    model, tok = load_default_model(getattr(torch, args.dtype))
    ids = prompts(tok, "grounded", args.requests)
    outs, base, per_row = outputs_and_costs(model, tok, ids, args.batch, args.max_new, args.k)
    reqs = list(zip(ids, outs))
    print(f"# grounded workload, {args.requests} requests, batch {args.batch}, k <= {args.k}, {args.dtype}, "
          f"{torch.get_num_threads()} threads: a step of {args.batch} rows {base * 1e3:.1f} ms, "
          f"+{per_row * 1e3:.2f} ms a verified row (fitted to the engine's forwards)")
    plain = replay(reqs, args.batch, args.k, base, per_row, policy=lambda d, m, a: 0)
    rows = [("oracle (drafts what will be accepted)", replay(reqs, args.batch, args.k, base, per_row,
                                                              policy=lambda d, m, a: a))]
    for fixed in (1, 2, 3, 5, args.k):
        rows.append((f"k = {fixed}", replay(reqs, args.batch, args.k, base, per_row,
                                            policy=lambda d, m, a, n=fixed: n)))
    # Per match-length class: the empirical chance that the j-th drafted token is accepted (in-sample).
    reached: dict[int, list[int]] = defaultdict(lambda: [0] * (args.k + 2))
    seen: dict[int, int] = defaultdict(int)

    def record(d, m, a):
        c = SpeculationController.match_class(m)
        seen[c] += 1
        for j in range(1, a + 1):
            reached[c][j] += 1
        return a

    replay(reqs, args.batch, args.k, base, per_row, policy=record)
    chance = {c: [n / seen[c] for n in reached[c]] for c in seen}
    best = (0.0, 0.0)
    for tau in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4):
        def by_class(d, m, a, tau=tau):
            p, n = chance.get(SpeculationController.match_class(m), [0.0] * (args.k + 2)), 0
            while n < args.k and p[n + 1] >= tau:
                n += 1
            return n
        best = max(best, replay(reqs, args.batch, args.k, base, per_row, policy=by_class))
    rows.append(("best per-match-class policy (in-sample)", best))  # the best over all steps, and its full steps
    rows.append(("two branches, oracle (each trimmed to its run)", replay(reqs, args.batch, args.k, base, per_row,
                                                                     policy=lambda d, m, a: a,
                                                                     branch=lambda d, b: b)))
    rows.append(("two branches, k = 5 and 3", replay(reqs, args.batch, args.k, base, per_row,
                                                     policy=lambda d, m, a: 5, branch=lambda d, b: 3)))
    rows.append(("the engine's SpeculationController", replay(reqs, args.batch, args.k, base, per_row,
                                                              controller=SpeculationController())))
    print(f"{'policy':48} {'all steps':>9} {'full batch':>10}")
    for name, (tok_s, full_tok_s) in rows:
        print(f"{name:48} {tok_s / plain[0]:8.2f}x {full_tok_s / plain[1]:9.2f}x")


if __name__ == "__main__":
    main()
