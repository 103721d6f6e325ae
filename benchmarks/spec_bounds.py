"""How far prompt lookup can take the grounded workload at a batch size: the engine's greedy outputs replayed under
the step costs measured on this machine, for drafting policies from the best possible down to the engine's own.

    python benchmarks/spec_bounds.py [--batch 4] [--requests 16] [--max-new 128] [-k 10] [--dtype float32]

1. Runs the grounded workload of ``speculative.py`` on the engine without speculation: its greedy outputs are what
   any exact speculation must produce.
2. Measures what a decode step costs by its rows: the engine's whole decode steps (drafting to appending), one
   request and then ``batch`` requests at a time, each drafting exactly ``j`` tokens a step for ``j`` = 0 .. k (a
   drafter whose tokens are never accepted: only the shape of the step matters). A step's cost is then each
   series' cost at its row count, interpolated between the rows measured and between the two series by its number
   of requests (a forward of few rows streams the weights whatever their number, so the first drafted rows are
   nearly free and the later ones cost their products: not a line).
3. Replays decoding of those outputs ``batch`` requests at a time (a finished request's place taken by the next),
   prompt lookup (``ngram_match``) drafting at each step, under those costs, and prints tokens/s against no
   speculation for: the **oracle** (drafts exactly the tokens that will be accepted: no policy does better with these
   drafts), fixed k, the best **per match class** policy (each class's empirical chance that the j-th token is
   accepted, in-sample, against the best threshold: an optimistic bound for any policy that sees only the match)
   and the engine's ``SpeculationController`` (fed the replay's steps); over all decode steps, and over those that
   ran a full batch (``speculative.py``'s full column). Two more rows verify a second candidate beside each draft
   (the latest earlier continuation starting with another token: a two-branch tree, not built in the engine),
   trimmed by the oracle and at fixed lengths: what better candidates, rather than a better policy, could add.

The replayed controller's ratio is the check on the costs: it should sit near what ``speculative.py`` measures for
the engine on the same machine.
"""

from __future__ import annotations

import argparse
import bisect
import sys
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


def greedy_outputs(model, tok, ids, batch, max_new) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    with LLMEngine(model, tok, num_blocks=4096, max_num_seqs=batch, enable_prefix_caching=False) as engine:
        return [o.token_ids for o in engine.generate(ids, params, use_tqdm=False)]


class RejectedDrafter:
    """Drafts ``k`` tokens a step that verification rejects (the token after the last, changed): a step's shape."""

    drafts_first = True

    def __init__(self, k: int) -> None:
        self.k = k

    def propose(self, seqs, ks) -> None:
        for seq, k in zip(seqs, ks):
            seq.spec_token_ids, seq.spec_match, seq.spec_agreed = [seq.token_ids[-1] ^ 1] * min(k, self.k), 1, True

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...

    def close(self) -> None: ...


def step_costs(model, tok, ids, batch, k, steps=24) -> dict[int, list[tuple[int, float]]]:
    """Per number of requests (one and ``batch``): (rows, median seconds of a whole decode step) with each request
    drafting 0 .. ``k`` tokens a step."""
    params = SamplingParams(max_new_tokens=steps, temperature=0)
    costs: dict[int, list[tuple[int, float]]] = {}
    for seqs in sorted({1, batch}):
        for j in range(k + 1):
            spec = {"method": "ngram", "num_tokens": j, "adaptive": False} if j else None
            seconds: list[float] = []
            with LLMEngine(model, tok, num_blocks=4096, max_num_seqs=seqs, enable_prefix_caching=False,
                           speculative=spec) as engine:
                if j:
                    config = engine.config.speculative
                    engine.speculator.drafters[("ngram", config.prompt_lookup_min, config.prompt_lookup_max)] = \
                        RejectedDrafter(j)
                record = engine.metrics.record_decode_step

                def timed(tokens: int, step_seconds: float, record=record) -> None:
                    if tokens == seqs:  # a full step (the last ones may draft fewer)
                        seconds.append(step_seconds)
                    record(tokens, step_seconds)

                engine.metrics.record_decode_step = timed
                engine.generate(ids[:seqs], params, use_tqdm=False)
            seconds.sort()
            costs.setdefault(seqs, []).append((seqs * (1 + j), seconds[len(seconds) // 2]))
    return costs


def cost_of(costs: dict[int, list[tuple[int, float]]], seqs: int, rows: int) -> float:
    """Seconds of a step of ``seqs`` requests and ``rows`` rows: each measured series interpolated at ``rows`` (held
    at its first point below it, extended past its last by its last segment's slope), and between the series by
    the number of requests."""
    def at(series: list[tuple[int, float]]) -> float:
        if len(series) == 1 or rows <= series[0][0]:
            return series[0][1]
        i = min(bisect.bisect_left(series, (rows, 0.0)), len(series) - 1)
        (r0, s0), (r1, s1) = series[i - 1], series[i]
        return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)

    low, high = min(costs), max(costs)
    if low == high:
        return at(costs[low])
    share = (seqs - low) / (high - low)
    return max((1 - share) * at(costs[low]) + share * at(costs[high]), 1e-6)


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


def replay(reqs, batch, k, costs, policy=None, controller=None, branch=None) -> tuple[float, float]:
    """Tokens/s of decoding ``reqs`` (prompt, output) ``batch`` at a time, steps costing ``costs``, ``policy(draft,
    seq, accepted)`` (``seq``: its match, ``spec_match`` and ``spec_agreed``) or the controller choosing each draft's
    length: over all steps, and over the steps that ran a full batch. With
    ``branch(draft, accepted)``, a second branch (``second_candidate``) of that length is verified beside the first
    (a two-branch tree: both branches' rows are paid for, the longer accepted run is kept)."""
    queue, live, pos, seqs = list(range(len(reqs))), [], {}, {}
    seconds = tokens = full_seconds = full_tokens = 0.0
    while queue or live:
        while queue and len(live) < batch:
            i = queue.pop(0)
            live.append(i)
            pos[i] = 0
            seqs[i] = types.SimpleNamespace(spec_match=0, spec_agreed=False, spec_hits=[0.0, 0.0],
                                            spec_trials=[0.0, 0.0])
        drafts, accepted, extra_rows, extra_accepted = [], [], 0, []
        for i in live:
            prompt, out = reqs[i]
            draft, seqs[i].spec_match, seqs[i].spec_agreed = ngram_match(prompt + out[:pos[i]], k, 1, 3)
            a = accepted_length(draft, out[pos[i]:])
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
            ks = [min(policy(d, seqs[i], a), len(d)) for i, d, a in zip(live, drafts, accepted)]
        step, stepping = cost_of(costs, len(live), len(live) + sum(ks) + extra_rows), len(live)
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
    reqs = list(zip(ids, greedy_outputs(model, tok, ids, args.batch, args.max_new)))
    costs = step_costs(model, tok, ids, args.batch, args.k)
    print(f"# grounded workload, {args.requests} requests, batch {args.batch}, k <= {args.k}, {args.dtype}, "
          f"{torch.get_num_threads()} threads; a decode step's ms by its rows (measured):")
    for seqs, series in sorted(costs.items()):
        print(f"# {seqs} request(s): " + "  ".join(f"{rows}: {seconds * 1e3:.1f}" for rows, seconds in series))

    def run(**how) -> tuple[float, float]:
        return replay(reqs, args.batch, args.k, costs, **how)

    plain = run(policy=lambda d, s, a: 0)
    rows = [("oracle (drafts what will be accepted)", run(policy=lambda d, s, a: a))]
    for fixed in (1, 2, 3, 5, args.k):
        rows.append((f"k = {fixed}", run(policy=lambda d, s, a, n=fixed: n)))
    # Per match class (the controller's: length class, agreed): the chance that the j-th drafted token is accepted.
    reached: dict[tuple, list[int]] = defaultdict(lambda: [0] * (args.k + 2))
    seen: dict[tuple, int] = defaultdict(int)

    def record(d, s, a):
        key = SpeculationController.match_key(s)
        seen[key] += 1
        for j in range(1, a + 1):
            reached[key][j] += 1
        return a

    run(policy=record)
    chance = {key: [n / seen[key] for n in reached[key]] for key in seen}
    best = (0.0, 0.0)
    for tau in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4):
        def by_class(d, s, a, tau=tau):
            p, n = chance.get(SpeculationController.match_key(s), [0.0] * (args.k + 2)), 0
            while n < args.k and p[n + 1] >= tau:
                n += 1
            return n
        best = max(best, run(policy=by_class))
    rows.append(("best per-match-class policy (in-sample)", best))  # the best over all steps, and its full steps
    rows.append(("two branches, oracle (each trimmed to its run)", run(policy=lambda d, s, a: a,
                                                                     branch=lambda d, b: b)))
    rows.append(("two branches, k = 5 and 3", run(policy=lambda d, s, a: 5, branch=lambda d, b: 3)))
    rows.append(("the engine's SpeculationController", run(controller=SpeculationController())))
    print(f"{'policy':48} {'all steps':>9} {'full batch':>10}")
    for name, (tok_s, full_tok_s) in rows:
        print(f"{name:48} {tok_s / plain[0]:8.2f}x {full_tok_s / plain[1]:9.2f}x")


if __name__ == "__main__":
    main()
