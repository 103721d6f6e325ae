"""The CUDA path, checked on the CPU as far as the CPU allows (issue 17).

* the plan for a CUDA model (a fake device: ``build_plan`` only reads its type) takes the Triton kernels and CUDA
  graphs and never the CPU-only paths; ``cuda_graphs`` is validated like the other engine options;
* the padded batch sizes of the decode graphs;
* a step's inputs reach the device in one copy;
* in a fresh interpreter with ``TRITON_INTERPRET=1`` (``tests/gpu_path_child.py``): the engine on the Triton
  kernels equals HF ``generate``; decode graphs (capture/replay through ``EagerGraphStandIn``) give the same tokens,
  their padded rows touch only the null block, and no forward synchronises with the host;
* ``benchmarks/gpu_check.py --dry-run`` (every part of the GPU check at tiny sizes, interpreted) passes.

triton 3.6's interpreter (the GPU machine's image) cannot run the attention kernels (a scalar ``tl.load`` comes back
as a one-element array, which ``range`` rejects); the compiled kernels are not affected. The two interpreted tests
skip there, and fail instead under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model, tiny_prompts
from hf_paged import LLMEngine, SamplingParams
from hf_paged.execution.cuda_graphs import graph_batch_sizes, padded_batch_size
from hf_paged.config import EngineConfig
from hf_paged.execution.plan import build_plan

REPO = Path(__file__).resolve().parent.parent


def _interpreter_usable() -> None:
    """Skip (fail under CI=true) where triton is missing or its interpreter cannot run the attention kernels."""
    try:
        import triton
    except ImportError as exc:
        reason = f"triton is not importable: {exc}"
    else:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
        if (major, minor) >= (3, 7):
            return
        reason = f"triton {triton.__version__}'s interpreter cannot run the attention kernels (see module docstring)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason + " (CI=true: required)")
    pytest.skip(reason)


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("HF_PAGED_FORCE_TORCH", None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


# ---- the plan --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_plan_takes_triton_and_graphs_never_cpu_paths(dtype, monkeypatch):
    pytest.importorskip("triton")
    for name in ("HF_PAGED_FORCE_TORCH", "HF_PAGED_FORCE_TRITON", "HF_PAGED_CPU_KERNEL", "HF_PAGED_AMX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_PAGED_CPU_KERNEL", "1")
    # Every CPU speed path asked for: none of them may be taken on CUDA.
    plan = build_plan("cuda", dtype, cpu_kernels=True, pack_weights=True, fuse_layers=True)
    assert (plan.device, plan.attention, plan.cache_write, plan.linears) == ("cuda", "triton", "triton", "torch")
    assert plan.triton and not plan.cpu_kernels and not plan.fused_layers and not plan.one_call_layers
    assert plan.cuda_graphs and "cuda_graphs=True" in str(plan)
    assert not build_plan("cuda:0", dtype, cuda_graphs=False).cuda_graphs
    if plan_compiles():
        assert not build_plan("cuda", dtype, compile=True).cuda_graphs
    # Without Triton, CUDA runs the PyTorch path and no graphs (its attention shapes its work from host lists).
    torch_plan = build_plan("cuda", dtype, triton=False)
    assert torch_plan.attention == "torch" and torch_plan.cache_write == "torch" and not torch_plan.cuda_graphs
    with pytest.raises(ValueError, match="cuda_graphs"):
        build_plan("cuda", dtype, triton=False, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs"):
        build_plan("cpu", dtype, cuda_graphs=True)
    assert not build_plan("cpu", dtype).cuda_graphs


def plan_compiles() -> bool:
    from hf_paged.execution.kernels.paged_attention import OPAQUE_METADATA

    return OPAQUE_METADATA


def test_cuda_graphs_engine_option(tiny_model_dir):
    EngineConfig.from_options({"cuda_graphs": None})
    EngineConfig.from_options({"cuda_graphs": False})
    with pytest.raises(ValueError, match="cuda_graphs"):
        EngineConfig.from_options({"cuda_graphs": "yes"})
    model = build_tiny_model("llama", tiny_model_dir)
    with pytest.raises(ValueError, match="cuda_graphs"):
        LLMEngine(model, None, num_blocks=8, cuda_graphs=True)  # a CPU model
    with LLMEngine(model, None, num_blocks=8, cuda_graphs=False) as engine:
        assert not engine.plan.cuda_graphs and engine.runner.decode_graphs is None


# ---- decode graphs: sizes --------------------------------------------------------------------------------------------
def test_graph_batch_sizes_follow_vllm():
    assert graph_batch_sizes(256) == [1, 2, 4] + list(range(8, 257, 8))
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(1) == [1]
    sizes = graph_batch_sizes(64)
    assert [padded_batch_size(n, sizes) for n in (1, 2, 3, 4, 5, 8, 9, 63, 64)] == [1, 2, 4, 4, 8, 8, 16, 64, 64]
    assert padded_batch_size(65, sizes) is None
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


# ---- one copy of the step's inputs -----------------------------------------------------------------------------------
def test_step_inputs_reach_the_device_in_one_copy(tiny_model_dir, monkeypatch):
    import hf_paged.execution.model_runner as runner_module
    import hf_paged.execution.step_inputs as step_inputs_module

    model = build_tiny_model("llama", tiny_model_dir)
    copies, built = [], []
    real_to_device, real_build = step_inputs_module.to_device, runner_module.build_step_inputs

    def to_device(values, device):
        copies.append(len(values))
        return real_to_device(values, device)

    def build_step_inputs(step, *args):
        out = real_build(step, *args)
        built.append((step, out))
        return out

    monkeypatch.setattr(step_inputs_module, "to_device", to_device)
    monkeypatch.setattr(runner_module, "build_step_inputs", build_step_inputs)
    with LLMEngine(model, None, num_blocks=64, block_size=4, max_num_batched_tokens=16) as engine:
        copies.clear()
        built.clear()  # the start-up probe's steps
        prompts = tiny_prompts(3, seed=4)
        outputs = engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True),
                                  use_tqdm=False)
        assert all(len(o.token_ids) == 4 for o in outputs)
        assert len(copies) == len(built) > 1  # one staging copy per step (chunked prefill, mixed, decode steps)
        for step, inputs in built:
            meta = inputs.meta
            assert inputs.input_ids.shape == inputs.positions.shape == (1, step.num_tokens)
            assert meta.block_tables.shape == (len(step.seqs), max(len(s.block_ids) for s in step.seqs))
            assert meta.num_decodes == step.num_decodes
            storage = meta.slot_mapping.untyped_storage().data_ptr()
            for tensor in (inputs.input_ids, inputs.positions, meta.block_tables, meta.cu_seqlens_q,
                           inputs.logits_rows):
                assert tensor.untyped_storage().data_ptr() == storage
            assert meta.kv_lens.dtype == torch.int32 and meta.block_tables.is_contiguous()
            assert inputs.sample_rows == [i for i, s in enumerate(step.seqs) if s.samples]


# ---- the engine on the Triton kernels, decode graphs, host synchronisation (interpreted, fresh process) -------------
def test_engine_on_triton_with_decode_graphs_and_no_host_sync():
    _interpreter_usable()
    proc = _run([str(REPO / "tests" / "gpu_path_child.py")], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("OK ") == 2, proc.stdout


# ---- the GPU check cannot rot ----------------------------------------------------------------------------------------
def test_gpu_check_dry_run(tmp_path):
    _interpreter_usable()
    # About 30 s on an idle 2-core machine; the bound leaves room for a loaded one.
    proc = _run([str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", str(tmp_path)], timeout=150)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and not report["failed"]
    rows = report["rows"]
    assert {r["part"] for r in rows} == {"kernels", "smollm2", "bandwidth", "throughput"}
    assert all(r["status"] in ("ok", "info") for r in rows), [r for r in rows if r["status"] not in ("ok", "info")]
    fp32 = [r for r in rows if r["part"] == "smollm2" and r["case"].startswith("float32")]
    assert len(fp32) == 2 and all(r["status"] == "ok" and r["graph_replays"] >= 0 for r in fp32)
    assert any(r["graph_replays"] > 0 for r in fp32)
    assert len([r for r in rows if r["part"] == "throughput" and "tok_per_s" in r]) == 4
    assert "| part" in (tmp_path / "gpu_check.md").read_text()
