"""Every x86-64 CPU tier below this machine's, tested here: a fresh process per tier (``tests/cpu_tier_child.py``)
started with ``cpu_isa.emulation_env(tier)`` builds the C library for the tier (``HF_PAGED_CPU_ISA``: AVX2 is
``-march=x86-64-v3``), caps torch's own kernels, MKL and oneDNN at it (so torch refuses bf16 packing as on an
AVX2-only CPU), checks that no plan chooses a path above the tier, runs the small-row kernel against ``F.linear``,
and runs a tiny Llama through every plan that matters: fp32 with HF's greedy tokens exactly, bf16 within bf16 noise
of transformers' own forward. ``avx2-cap`` sets only ``HF_PAGED_CPU_ISA=avx2``: oneDNN could pack bf16 there, and
the plan must still not use it (a real AVX2 CPU cannot).

The children run at the same time, as many as there are cores. A tier above this CPU's is skipped; where the C
library cannot be built the tests skip too, and fail under ``CI=true``."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hf_paged.execution.kernels import cpu_isa

import cpu_tier_child as child

CHILD = Path(__file__).with_name("cpu_tier_child.py")


def _env(config: str) -> dict[str, str]:
    tier, torch_capped, _ = child.CONFIGS[config]
    extra = cpu_isa.emulation_env(tier) if torch_capped else {"HF_PAGED_CPU_ISA": tier}
    # What the suite's own process may have been started with (a whole suite run under emulation_env) is not the
    # child's: each config sets exactly its own.
    inherited = ("HF_PAGED_CFLAGS", "HF_PAGED_CPU_KERNEL", "HF_PAGED_AVX512_LINEAR", "HF_PAGED_AMX",
                 *cpu_isa.emulation_env("avx2"))
    base = {k: v for k, v in os.environ.items() if k not in inherited}
    return {**base, **extra, "OMP_NUM_THREADS": "2"}


def _runnable(config: str) -> str | None:
    """Why CONFIG cannot run on this machine (None: it can)."""
    tier = child.CONFIGS[config][0]
    if not cpu_isa.x86():
        return "the x86-64 tiers need an x86-64 CPU"
    if cpu_isa.TIERS.index(tier) > cpu_isa.TIERS.index(cpu_isa.detected()):
        return f"this CPU's highest tier is {cpu_isa.detected()}, below {tier}"
    return None


def _run(config: str) -> dict[str, str]:
    """check name -> "OK" or the failure; {"SKIP": why} where the library cannot be built."""
    try:
        proc = subprocess.run([sys.executable, str(CHILD), config], env=_env(config), capture_output=True, text=True,
                              timeout=300, cwd=CHILD.parent.parent)
    except subprocess.TimeoutExpired as exc:
        return {"CRASH": f"timed out after {exc.timeout:.0f} s"}
    found: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("SKIP "):
            return {"SKIP": line[5:]}
        if line.startswith("CHECK "):
            name, verdict = line[6:].split(" ", 1)
            found[name] = "OK" if verdict == "OK" else verdict[5:].replace("\\n", "\n")
    if proc.returncode != 0:
        found["CRASH"] = f"exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return found


@pytest.fixture(scope="module")
def reports(request) -> dict[str, dict[str, str]]:
    wanted = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and "config" in params:
            wanted.add(params["config"])
    configs = [c for c in child.CONFIGS if c in wanted and _runnable(c) is None]
    with ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) // 2)) as pool:
        return dict(zip(configs, pool.map(_run, configs)))


CASES = [(config, name) for config in child.CONFIGS for name in child.checks(config)]


@pytest.mark.parametrize("config,check", CASES, ids=[f"{c}:{n}" for c, n in CASES])
def test_tier(config, check, reports):
    why = _runnable(config)
    if why:
        pytest.skip(why)
    report = reports[config]
    if "SKIP" in report:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(report["SKIP"] + " (CI=true: required)")
        pytest.skip(report["SKIP"])
    assert check in report, f"{config} did not report {check}:\n{report.get('CRASH', '')}"
    assert report[check] == "OK", report[check]


def test_tiers_and_flags():
    """The tiers' flags and emulation variables, and the probes of this process (no tier forced here)."""
    assert cpu_isa.TARGET_FLAGS["avx2"] == ["-march=x86-64-v3"] and cpu_isa.TARGET_FLAGS["avx512"][0] == \
        "-march=x86-64-v4"
    env = cpu_isa.emulation_env("avx2")
    assert env.pop("TORCHINDUCTOR_CACHE_DIR").endswith("_avx2")
    assert env == {"HF_PAGED_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                   "ONEDNN_MAX_CPU_ISA": "AVX2"}
    with pytest.raises(ValueError):
        cpu_isa.emulation_env("avx3")
    if os.environ.get("HF_PAGED_CPU_ISA", "native") == "native":
        assert not cpu_isa.forced() and cpu_isa.tier() == cpu_isa.detected()
        assert cpu_isa.target_flags() == ["-march=native"]
        if cpu_isa.x86():
            assert all(cpu_isa.allows(t) for t in cpu_isa.TIERS[: cpu_isa.TIERS.index(cpu_isa.detected()) + 1])
