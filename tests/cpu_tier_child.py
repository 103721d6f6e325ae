"""One CPU tier's checks in a process of its own: ``tests/test_cpu_tiers.py`` starts it with the tier's environment
(``cpu_isa.emulation_env``: ``HF_PAGED_CPU_ISA`` for hf_paged, and torch's own dispatch, MKL and oneDNN capped at
the tier too, so that, e.g., torch refuses to pack bf16 weights as on an AVX2-only CPU) and reads its report.

    python tests/cpu_tier_child.py CONFIG

CONFIG is a key of :data:`CONFIGS`. Checks, each reported as one line ``CHECK <name> OK`` or
``CHECK <name> FAIL <why>`` (``SKIP <why>`` alone where the C library cannot be built):

* ``build``: the library is built with the tier's target flags, under a file name carrying the tier;
* ``probes``: what the library and torch say they can run matches the tier (the small-row kernel's vector width,
  no AMX, oneDNN's bf16 packing refused below AVX-512);
* ``plans``: every option combination's plan, fp32 and bf16, stays within the tier and logs it;
* ``linear-float32`` / ``linear-bfloat16``: the small-row kernel against ``F.linear``, 1 to 300 rows (prefill-sized
  products included: on AVX2 bf16 the kernel takes every row count), strided rows, with and without bias;
* ``engine-float32-<plan>``: a tiny Llama's greedy tokens through the engine equal HF ``generate``'s exactly;
* ``engine-bfloat16-<plan>``: in bf16, every token is within bf16 noise of the most likely one by transformers' own
  forward and the engine's logprobs match (the tolerance of ``test_fused_layers.py``'s bf16 test).

The plans: ``default`` (fused layers, one C call per decode layer, the tier's linears), ``unfused``, ``unpacked``,
``no-kernels`` (PyTorch attention, oneDNN or plain linears) and ``torch`` (neither). Prompts of 20-60 tokens make
prefill steps of more than 128 rows, so the linears' large-product path runs too, and a small token budget makes
chunked prefills and mixed steps.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_paged import LLMEngine, SamplingParams  # noqa: E402
from hf_paged.execution.kernels import cpu_isa, cpu_library  # noqa: E402
from hf_paged.execution.plan import build_plan  # noqa: E402

PLANS = {"default": {}, "unfused": {"fuse_layers": False}, "unpacked": {"pack_weights": False},
         "no-kernels": {"cpu_kernels": False}, "torch": {"cpu_kernels": False, "pack_weights": False}}
DTYPES = ("float32", "bfloat16")
# config -> (tier, whether torch is capped too (the environment of cpu_isa.emulation_env), engine plans to run)
CONFIGS = {
    "avx2": ("avx2", True, list(PLANS)),
    "avx2-cap": ("avx2", False, ["default", "no-kernels"]),  # hf_paged capped, torch not: the cap is hf_paged's own
    "avx512": ("avx512", True, ["default", "no-kernels"]),
}
# What each tier's plans may choose for the linears, by dtype (the kernels on; oneDNN or torch with them off).
ALLOWED_LINEARS = {
    "avx2": {"float32": {"avx2", "onednn", "torch"}, "bfloat16": {"avx2", "torch"}},
    "avx512": {"float32": {"avx512", "onednn", "torch"}, "bfloat16": {"avx512", "onednn", "torch"}},
}
SMALL_LINEAR_BITS = {"avx2": 256, "avx512": 512}


def checks(config: str) -> list[str]:
    """The names of the checks CONFIG reports (known before it runs: the test ids)."""
    plans = CONFIGS[config][2]
    return (["build", "probes", "plans", "linear-float32", "linear-bfloat16"]
            + [f"engine-{dtype}-{plan}" for dtype in DTYPES for plan in plans])


def check_build(tier: str) -> None:
    path = cpu_library.library_path()
    assert cpu_isa.tier() == tier and cpu_isa.forced(), (cpu_isa.tier(), cpu_isa.requested())
    assert f"_{tier}_" in path.name, path.name
    flags = cpu_library.compiler_flags()
    assert flags[-len(cpu_isa.TARGET_FLAGS[tier]):] == cpu_isa.TARGET_FLAGS[tier] and "-march=native" not in flags


def check_probes(tier: str, torch_capped: bool) -> None:
    from hf_paged.execution.patches.linear import amx_available, small_rows_available, small_rows_bf16, small_rows_isa

    lib = cpu_library.load()
    assert lib.hf_small_linear_available() == SMALL_LINEAR_BITS[tier], lib.hf_small_linear_available()
    assert small_rows_isa() == tier
    assert not lib.hf_amx_available() and not amx_available()
    assert small_rows_available(torch.float32)
    assert small_rows_available(torch.bfloat16) and small_rows_bf16() == 1  # bf16 widened to fp32 on both
    assert cpu_isa.onednn_packs(torch.float32)
    assert cpu_isa.onednn_packs(torch.bfloat16) == (tier != "avx2")
    if torch_capped:
        assert cpu_isa.torch_capability() == cpu_isa._EMULATION[tier][0].upper(), cpu_isa.torch_capability()
    if tier == "avx2":  # torch capped: it refuses bf16 packing as on an AVX2-only CPU; else only the plan refuses
        assert cpu_isa._onednn_probe(torch.bfloat16) == (not torch_capped)


def check_plans(tier: str) -> None:
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("hf_paged.engine.llm_engine").addHandler(handler)
    logging.getLogger("hf_paged.engine.llm_engine").setLevel(logging.INFO)
    for dtype in DTYPES:
        for kernels in (True, False):
            for pack in (True, False):
                for fuse in (True, False):
                    for amx in (None, False):
                        plan = build_plan("cpu", getattr(torch, dtype), cpu_kernels=kernels, pack_weights=pack,
                                          fuse_layers=fuse, amx=amx)
                        where = f"{dtype} kernels={kernels} pack={pack} fuse={fuse} amx={amx}: {plan}"
                        assert plan.linears in ALLOWED_LINEARS[tier][dtype], where
                        assert plan.isa.startswith(f"{tier} (HF_PAGED_CPU_ISA"), where
                        assert plan.one_call_layers == (plan.fused_layers and plan.linears == tier), where
                        if kernels and pack:
                            assert plan.linears != "torch", where
        # the engine logs the plan, the tier with it
    model = _tiny_llama(torch.float32)
    LLMEngine(model, None, num_blocks=16).close()
    assert any(f"isa={tier} (HF_PAGED_CPU_ISA" in r.getMessage() for r in records), [r.getMessage() for r in records]


def check_linear(dtype: torch.dtype) -> None:
    from hf_paged.execution.patches.linear import SmallRowsWeight

    g = torch.Generator().manual_seed(0)
    # 150 columns: three 64-column groups on AVX-512 (two threads split them in halves from 8 rows on), the last 22
    # columns wide; ten 16-column groups on AVX2.
    weight = torch.randn(150, 64, generator=g).to(dtype)
    bias = torch.randn(150, generator=g).to(dtype)
    assert SmallRowsWeight.supports(weight), "the tier's kernel refused the weight"
    packed = SmallRowsWeight(weight)
    assert (packed.large is None) == (dtype == torch.bfloat16)  # widened bf16: the kernel takes every row count
    for rows in (1, 5, 33, 128, 129, 300):
        x = torch.randn(rows, 90, generator=g).to(dtype)[:, 13:77]  # rows with a stride of 90 elements
        for b in (None, bias):
            out = packed.matmul(x, b)
            ref = F.linear(x.float(), weight.float(), None if b is None else b.float())
            ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -20
            assert out.dtype == dtype and out.shape == (rows, 150)
            bad = ((out.float() - ref).abs() > ref.abs() * ulp + 1e-4).sum().item()
            assert bad == 0, f"{rows} rows, bias={b is not None}: {bad} values off"
            if rows == 33:  # a verification step's rows have the bits each has alone (a decode step)
                alone = torch.cat([packed.matmul(x[i:i + 1], b) for i in range(rows)])
                assert torch.equal(out, alone), f"{rows} rows, bias={b is not None}: bits differ from rows alone"


def _tiny_llama(dtype: torch.dtype) -> torch.nn.Module:
    from conftest import build_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="hf_paged_tier_"))
    return build_tiny_model("llama", folder).to(dtype)


def _prompts() -> list[list[int]]:
    from conftest import tiny_prompts

    return tiny_prompts(6, seed=31, low=20, high=60)


def check_engine(dtype: str, options: dict, model: torch.nn.Module, refs: list | None) -> None:
    prompts = _prompts()
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    runs = []
    for budget in (256, 24):  # whole prompts in one step (over 128 rows); chunked prefills mixed with decodes
        with LLMEngine(model, None, num_blocks=200, max_num_batched_tokens=budget, enable_prefix_caching=False,
                       **options) as engine:
            runs.append(engine.generate(prompts, params, use_tqdm=False))
    for run in runs:
        if refs is not None:
            assert [o.token_ids for o in run] == refs, "greedy tokens differ from HF generate's"
            continue
        for prompt, out in zip(prompts, run):
            ids = torch.tensor([prompt + out.token_ids])
            with torch.inference_mode():
                logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
            chosen = logp.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
            assert (logp.max(dim=-1).values - chosen <= 0.05).all(), "a token far from the most likely one"
            torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=0.05, rtol=0)


def main(config: str) -> None:
    tier, torch_capped, plans = CONFIGS[config]
    if cpu_library.load() is None:
        print(f"SKIP the C CPU kernels could not be built for {tier}: {cpu_library.failure()}", flush=True)
        return
    torch.set_num_threads(2)

    def run(name, fn, *args):
        try:
            fn(*args)
            print(f"CHECK {name} OK", flush=True)
        except Exception:
            print(f"CHECK {name} FAIL " + traceback.format_exc().replace("\n", "\\n"), flush=True)

    run("build", check_build, tier)
    run("probes", check_probes, tier, torch_capped)
    run("plans", check_plans, tier)
    for dtype in DTYPES:
        run(f"linear-{dtype}", check_linear, getattr(torch, dtype))
    from test_engine import hf_greedy

    for dtype in DTYPES:
        model = _tiny_llama(getattr(torch, dtype))
        refs = hf_greedy(model, _prompts(), 8, 0, set(), batch=6) if dtype == "float32" else None
        for plan in plans:
            run(f"engine-{dtype}-{plan}", check_engine, dtype, PLANS[plan], model, refs)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1])
