"""The C kernels' own test harness (``hf_paged/execution/kernels/csrc/tests/test_kernels.c``: every kernel family against
naive oracles in C, no Python in the loop) built and run for each target the library is built for:

* this machine, ``-march=native`` (on an x86-64 machine with AVX-512 / AMX, that tier), and ``-march=x86-64-v3``
  (AVX2);
* AArch64, cross-compiled with Debian's ``aarch64-linux-gnu-gcc`` (``make cross`` installs it with qemu) and run
  under ``qemu-aarch64``: ``armv8-a`` (NEON; run as a Cortex-A72, which has nothing newer) and, with ``-cpu max``
  (every AArch64 extension emulated), ``armv8.2-a+bf16``, ``armv8.6-a`` and ``armv8-a+sve``, the SVE build run with
  128-bit vectors and a subset of it with 256-bit ones (qemu runs wider SVE vectors ~20x slower). Each AArch64
  build must be free of warnings (``-Wall -Wextra -Werror``); the x86-64 ones build with ``-Wall -Wextra`` too, their
  warnings reported as pytest warnings.

Each target's library sources are compiled once with the library's own flags (``cpu_library.CFLAGS``, ``-c``
instead of ``-shared``) and linked both into the shared library, as ``cpu_library`` links it, and into the harness
(the harness's own file at -O1: it is only the oracle). The objects are cached by the hash of everything they are
made of (the source, the headers, the command, the compiler's version) in ``$HF_PAGED_CACHE/c_tests``, so a rerun
recompiles only what changed. The targets the selected tests need build together, then run together, as many jobs
as there are cores. Where a compiler, the cross libgomp or qemu is missing the tests skip, and fail under
``CI=true``. ``HF_PAGED_CROSS_CC`` and ``HF_PAGED_QEMU`` name other cross compilers and emulators.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest

from hf_paged import envs
from hf_paged.execution.kernels import cpu_library

HARNESS = cpu_library.CSRC / "tests" / "test_kernels.c"
CROSS_CC = os.environ.get("HF_PAGED_CROSS_CC", "aarch64-linux-gnu-gcc")
CROSS_ROOT = Path("/usr/aarch64-linux-gnu")  # qemu's -L, and where libgomp1-arm64-cross puts libgomp
QEMU = os.environ.get("HF_PAGED_QEMU", "qemu-aarch64")
WARNINGS = ["-Wall", "-Wextra"]
CACHE_DAYS = 14  # cached objects unused this long are deleted
SVE256_SUBSET = ("probes", "decode bf16_i8 G=4 hd=40 bs=8 window=24", "decode f32 G=1 hd=128 bs=16 window=0 softcap=0",
                 "prefill f32_i8 G=4 hd=64 bs=16", "prefill bf16 G=1 hd=128 bs=8", "write_kv", "rms_norm", "rope",
                 "silu_mul", "argmax")


@dataclass(frozen=True)
class Target:
    name: str
    cross: bool  # AArch64, run under qemu
    runs: tuple[tuple[str, str | None, tuple[str, ...]], ...]  # (run id, qemu -cpu, the harness's case filters)


TARGETS = {t.name: t for t in [
    Target("native", False, (("native", None, ()),)),
    Target("x86-64-v3", False, (("x86-64-v3", None, ()),)),
    Target("armv8-a", True, (("armv8-a", "cortex-a72", ()),)),  # a CPU with nothing past v8.0 + NEON
    Target("armv8.2-a+bf16", True, (("armv8.2-a+bf16", "max", ()),)),
    Target("armv8.6-a", True, (("armv8.6-a", "max", ()),)),
    Target("armv8-a+sve", True, (("armv8-a+sve-128", "max,sve-default-vector-length=16", ()),
                                 ("armv8-a+sve-256", "max,sve-default-vector-length=32", SVE256_SUBSET))),
]}
RUNS = {run_id: (t, cpu, filters) for t in TARGETS.values() for run_id, cpu, filters in t.runs}


def _x86_64() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


def _has_avx2() -> bool:
    try:
        return _x86_64() and " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _compiler(target: Target) -> str | None:
    if target.name == "x86-64-v3" and not _x86_64():
        return None
    if target.cross:
        return CROSS_CC if shutil.which(CROSS_CC) and (CROSS_ROOT / "lib" / "libgomp.so.1").exists() else None
    return cpu_library._compiler()


def _require(target: Target, run: bool) -> None:
    """Skip where the test does not apply; skip, or fail under CI=true, where a tool it needs is missing."""
    if target.name == "x86-64-v3" and not (_has_avx2() if run else _x86_64()):
        pytest.skip("x86-64-v3 builds on x86-64 only, and runs where the CPU has AVX2")
    missing = None
    if _compiler(target) is None:
        missing = f"no C compiler for {target.name}" + (
            f" ({CROSS_CC} and {CROSS_ROOT}/lib/libgomp.so.1)" if target.cross else "")
    elif run and target.cross and not shutil.which(QEMU):
        missing = f"no {QEMU} (qemu-user) to run the AArch64 harness"
    if missing:
        missing += "; `make cross` installs the AArch64 toolchain and qemu"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(missing + " (CI=true: required)")
        pytest.skip(missing)


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\ntimed out after {timeout:.0f} s: {' '.join(cmd)}"
    return res.returncode, res.stdout + res.stderr


@lru_cache(maxsize=None)
def _compiler_id(cc: str) -> str:
    return f"{shutil.which(cc)}\n{_run([cc, '--version'], 30)[1]}"


def _cache_dir() -> Path:
    return envs.cache_dir() / "c_tests"


def _compile(cc: str, args: list[str], src: Path, obj: Path) -> tuple[int, str]:
    """``cc args -c src -o obj``, or the cached object of the same inputs (and the same compiler output)."""
    digest = hashlib.sha256("\0".join([_compiler_id(cc), " ".join(args), src.name]).encode())
    for part in [src, *cpu_library.HEADERS]:
        digest.update(b"\0" + part.read_bytes())
    cached = _cache_dir() / f"{src.stem}-{digest.hexdigest()[:20]}.o"
    log = cached.with_suffix(".log")
    if cached.exists() and log.exists():
        for path in (cached, log):
            os.utime(path)
        shutil.copyfile(cached, obj)
        return 0, log.read_text()
    rc, out = _run([cc, *args, "-c", str(src), "-o", str(obj)], 600)
    if rc == 0:
        try:
            _cache_dir().mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            shutil.copyfile(obj, tmp)
            log.write_text(out)
            os.replace(tmp, cached)
        except OSError:
            pass
    return rc, out


def _prune_cache() -> None:
    cutoff = time.time() - CACHE_DAYS * 86400
    for path in _cache_dir().glob("*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass


@dataclass
class Build:
    ok: bool = True
    log: list[str] = field(default_factory=list)  # compiler and linker output (warnings, errors)
    harness: Path | None = None


def _build_all(names: list[str], folder: Path, jobs: int) -> dict[str, Build]:
    """Compile every source of every target (the slowest compiles first, all targets in one pool), then link each
    target's shared library and harness."""
    library_flags = [f for f in cpu_library.CFLAGS if f != "-shared"] + WARNINGS
    tasks = []  # (target, cc, args, src, obj)
    for name in names:
        target, cc = TARGETS[name], _compiler(TARGETS[name])
        (folder / name).mkdir(parents=True, exist_ok=True)
        flags = library_flags + (["-Werror"] if target.cross else []) + [f"-march={target.name}"]
        for src in [*cpu_library.SOURCES, HARNESS]:
            args = flags if src != HARNESS else [f if f != "-O3" else "-O1" for f in flags]
            tasks.append((name, cc, args, src, folder / name / f"{src.stem}.o"))
    tasks.sort(key=lambda t: -t[3].stat().st_size)  # the decode kernel first: its compiles take longest
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = list(pool.map(lambda t: (t, *_compile(*t[1:])), tasks))
    builds = {name: Build() for name in names}
    for (name, cc, args, src, _), rc, out in done:
        if rc != 0 or out.strip():
            builds[name].log.append(f"$ {cc} {' '.join(args)} -c {src}\n{out}")
        builds[name].ok &= rc == 0
    for name, b in builds.items():
        if not b.ok:
            continue
        cc = _compiler(TARGETS[name])
        objs = [str(folder / name / f"{src.stem}.o") for src in cpu_library.SOURCES]
        harness = folder / name / "test_kernels"
        for cmd in ([cc, "-shared", "-fopenmp", *objs, "-o", str(folder / name / "libhf_paged_cpu.so"), "-lm"],
                    [cc, "-fopenmp", *objs, str(folder / name / f"{HARNESS.stem}.o"), "-o", str(harness), "-lm"]):
            rc, out = _run(cmd, 120)
            if rc != 0 or out.strip():
                b.log.append(f"$ {' '.join(cmd)}\n{out}")
            b.ok &= rc == 0
        b.harness = harness if b.ok else None
    _prune_cache()
    return builds


def _harness_run(run_id: str, build: Build) -> tuple[list[str], int, str]:
    target, cpu, filters = RUNS[run_id]
    cmd = ([QEMU, "-L", str(CROSS_ROOT), "-cpu", cpu] if target.cross else []) + [str(build.harness), *filters]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "passive"}  # no spinning under qemu
    return (cmd, *_run(cmd, 300, env))


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """(builds, runs) of what this session's selected tests of this module need and can build and run here: the
    builds first, then the harness runs, each phase in a pool of as many jobs as there are cores."""
    wanted_targets, wanted_runs = set(), set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and "target" in params:
            wanted_targets.add(params["target"])
        if item.module is request.module and "run" in params:
            wanted_runs.add(params["run"])
            wanted_targets.add(RUNS[params["run"]][0].name)
    names = [n for n in TARGETS if n in wanted_targets and _compiler(TARGETS[n]) is not None]
    jobs = os.cpu_count() or 2
    builds = _build_all(names, tmp_path_factory.mktemp("c_kernels"), jobs)
    runnable = [r for r in RUNS if r in wanted_runs and RUNS[r][0].name in builds and builds[RUNS[r][0].name].ok
                and (not RUNS[r][0].cross or shutil.which(QEMU)) and (RUNS[r][0].name != "x86-64-v3" or _has_avx2())]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        runs = dict(zip(runnable, pool.map(lambda r: _harness_run(r, builds[RUNS[r][0].name]), runnable)))
    return builds, runs


@pytest.mark.parametrize("target", list(TARGETS))
def test_library_and_harness_build(target, results):
    t = TARGETS[target]
    _require(t, run=False)
    b = results[0][target]
    log = "\n".join(b.log)[-6000:]
    assert b.ok, f"{target} failed to build{' without warnings' if t.cross else ''}:\n{log}"
    if log:
        warnings.warn(f"{target} built with warnings:\n{log}")


@pytest.mark.parametrize("run", list(RUNS))
def test_harness_passes(run, results):
    target = RUNS[run][0]
    _require(target, run=True)
    builds, runs = results
    if not builds[target.name].ok:
        pytest.fail(f"{target.name} did not build (see test_library_and_harness_build[{target.name}])")
    cmd, rc, out = runs[run]
    failed = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
    assert rc == 0, f"{' '.join(cmd)} exited {rc}:\n" + "\n".join(failed[:40]) + "\n...\n" + out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.endswith(" 0 failed") and not last.startswith("0 cases"), last
