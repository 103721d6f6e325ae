"""The engine's decode speed at a git revision against this tree's, side by side in one run.

    python benchmarks/revision_ab.py [--base REV] [--batches 1,4] [--repeats 2] [--dtype float32|bfloat16]
                                     [--max-new 128]

Checks ``--base`` (default ``HEAD``) out into a temporary worktree, then runs the same child program on each tree in
turn, ``--repeats`` times, alternating (a machine's speed drifts over minutes; alternating spreads the drift over
both): the grounded workload of ``speculative.py`` (``2 b`` requests) decoded greedily at each batch size ``b``
without speculation, one process per run, each importing its own tree's ``hf_paged``. Prints each run's decode
tokens/s (the tokens of steps that computed no prompt tokens over those steps' time) and the best of each against
the base. C kernels are built per tree (their cache is keyed by source), so the base's first run may build them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = """
import json, sys, torch
root, batches, max_new, dtype = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4]
sys.path[:0] = [root, root + "/benchmarks"]
import hf_paged
assert hf_paged.__file__.startswith(root), hf_paged.__file__
from hf_paged import LLMEngine, SamplingParams
from hf_paged.models import load_default_model
from speculative import prompts
model, tok = load_default_model(getattr(torch, dtype))
out = {}
for b in batches:
    ids = prompts(tok, "grounded", 2 * b)
    with LLMEngine(model, tok, num_blocks=4096, max_num_seqs=b, enable_prefix_caching=False) as engine:
        engine.generate([ids[0][:32]], SamplingParams(max_new_tokens=4, temperature=0), use_tqdm=False)
        before = engine.stats()
        engine.generate(ids, SamplingParams(max_new_tokens=max_new, temperature=0), use_tqdm=False)
        after = engine.stats()
    out[b] = ((after["decode_step_tokens"] - before["decode_step_tokens"])
              / (after["decode_step_time_s"] - before["decode_step_time_s"]))
print("RESULT " + json.dumps(out))
"""


def run(root: Path, batches: str, max_new: int, dtype: str) -> dict[int, float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), batches, str(max_new), dtype],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"the run on {root} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return {int(b): v for b, v in json.loads(lines[-1][7:]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-new", type=int, default=128)
    args = ap.parse_args()
    repo = HERE.parent
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(base_tree), args.base],
                       check=True)
        try:
            trees = {"base": base_tree, "current": repo}
            best: dict[str, dict[int, float]] = {"base": {}, "current": {}}
            print(f"# engine decode tokens/s, grounded workload, {args.dtype}, greedy, no speculation: "
                  f"{args.base} (base) against this tree (current)")
            for i in range(args.repeats):
                for name, root in trees.items():
                    result = run(root, args.batches, args.max_new, args.dtype)
                    print(f"run {i + 1} {name:8} " + "  ".join(f"batch {b}: {v:6.1f}" for b, v in result.items()),
                          flush=True)
                    for b, v in result.items():
                        best[name][b] = max(best[name].get(b, 0.0), v)
            print("best: " + "  ".join(f"batch {b}: {best['base'][b]:.1f} -> {best['current'][b]:.1f} "
                                       f"({best['current'][b] / best['base'][b]:.2f}x)" for b in best["base"]))
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(base_tree)], check=False)


if __name__ == "__main__":
    main()
