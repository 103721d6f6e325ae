"""Tensor-parallel paged generation (``hf_paged.distributed``) under ``torchrun --nproc-per-node 2`` on the CPU (gloo).

Each launch runs ``tests/tp_worker_script.py`` (or the ``hf-paged`` command) as a subprocess on a free loopback
port, with a timeout, and checks many things at once through the JSON it writes. The oracle is the single-process
engine on the unsharded model (the same scenarios, run here) and transformers' own ``generate``:

* a tiny Llama and a tiny Qwen2: greedy tokens equal the single-process engine's, also with chunked prefill,
  preemption, prefix caching, n = 2 seeded sampling and beam search; the per-rank KV cache is half the single-process
  cache for the same block count (half the KV heads); every rank ran the same forward tokens; an aborted request's
  blocks are free afterwards (only rank 0 counts blocks) and the requests that reuse them are right; a rank that
  dies makes rank 0 fail its requests at once; ``hf_paged.wrap`` in an SPMD script returns transformers' tokens on
  every rank;
* ``torchrun -m hf_paged.cli generate`` on SmolLM2 (3 KV heads: attention replicated, the rest sharded) prints what
  the single-process engine generates.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import tp_worker_script as script
from conftest import build_tiny_model

LAUNCH_TIMEOUT_S = 150
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _require_gloo() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        if IN_CI:
            pytest.fail("torch.distributed with gloo is required under CI=true")
        pytest.skip("torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], name: str, timeout: float = LAUNCH_TIMEOUT_S, stdin: str | None = None,
             ) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 ARGS`` on a free loopback port; its output goes to /tmp/tp_<name>_<id>.log.
    Fails the test (with the log's tail) if it does not exit 0 in time."""
    log = Path(f"/tmp/tp_{name}_{uuid.uuid4().hex[:8]}.log")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_PAGED_TP_TIMEOUT="60")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), *args]
    with open(log, "w") as err:
        try:
            proc = subprocess.run(command, input=stdin, stdout=subprocess.PIPE, stderr=err, text=True,
                                  timeout=timeout, env=env, cwd=Path(__file__).resolve().parent.parent)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun did not finish in {timeout} s; log {log}:\n{log.read_text()[-12000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}; log {log}:\n{log.read_text()[-12000:]}")
    return proc


def _launch(model_name: str, folder: Path, extra: list[str]) -> tuple[dict, torch.nn.Module]:
    _require_gloo()
    model = build_tiny_model(model_name, folder)
    out = folder / f"{model_name}_tp.json"
    torchrun([str(Path(script.__file__)), str(folder / model_name), str(out), *extra], f"{model_name}")
    result = json.loads(out.read_text())
    rank1 = Path(f"{out}.rank1")
    result["rank1"] = json.loads(rank1.read_text()) if rank1.exists() else {}
    return result, model


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """Tiny Llama: every scenario, the abort, then rank 1 dies in the middle of a run."""
    return _launch("llama", tmp_path_factory.mktemp("tp_llama"), ["--dead-rank"])


@pytest.fixture(scope="module")
def qwen2_run(tmp_path_factory):
    """Tiny Qwen2 (biased q/k/v projections): every scenario, the abort, then an SPMD wrap-ed generate."""
    return _launch("qwen2", tmp_path_factory.mktemp("tp_qwen2"), ["--spmd"])


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tp_run(request):
    return request.getfixturevalue(f"{request.param}_run")


_reference_cache: dict = {}


def reference(model: torch.nn.Module, name: str) -> dict:
    """The same scenario on the unsharded model, in this process (the single-process engine)."""
    key = (id(model), name)
    if key not in _reference_cache:
        _reference_cache[key] = script.run_abort(model) if name == "abort" else script.run_scenario(model, name)
    return _reference_cache[key]


@pytest.mark.parametrize("scenario", list(script.SCENARIOS))
def test_tokens_equal_single_process_engine(tp_run, scenario):
    result, model = tp_run
    assert result["world_size"] == 2
    got = result["scenarios"][scenario]
    want = reference(model, scenario)
    assert got["tokens"] == want["tokens"]
    assert got["used_blocks_after"] == 0
    if scenario == "preemption":
        assert got["preemptions"] > 0, "the pool was meant to be too small for every request at once"
    if scenario == "prefix_caching":
        assert got["prefix_cache_hits"] >= 10 * 4 * 3, "the second batch should find the shared prefix"
    if scenario == "speculative":
        assert got["accepted_drafts"] > 0 and got["accepted_drafts"] == want["accepted_drafts"]
    if scenario == "n2_sampling":
        assert len(got["tokens"]) == 6 and got["tokens"][0] != got["tokens"][1]


def test_kv_cache_per_rank_is_half(tp_run):
    result, model = tp_run
    for name in ("greedy", "preemption", "prefix_caching"):
        got, want = result["scenarios"][name], reference(model, name)
        assert got["kv_bytes"] * 2 == want["kv_bytes"]
        assert got["num_blocks"] == want["num_blocks"] == script.SCENARIOS[name]["engine"]["num_blocks"]
        # [layer, K|V, blocks + null, block_size, KV heads, head_dim]: the same blocks, half the KV heads
        assert got["kv_shape"][:4] == want["kv_shape"][:4] and got["kv_shape"][5] == want["kv_shape"][5]
        assert got["kv_shape"][4] * 2 == want["kv_shape"][4]
    # the worker's last KV cache (the abort scenario's) is rank 0's size too: half a single-process block per block
    one_block = reference(model, "greedy")["kv_bytes"] // (script.SCENARIOS["greedy"]["engine"]["num_blocks"] + 1)
    assert result["workers"][0]["kv_bytes"] == (script.ABORT["engine"]["num_blocks"] + 1) * one_block // 2


def test_every_rank_ran_the_same_forwards(tp_run):
    result, _ = tp_run
    (worker,) = result["workers"]
    assert worker["rank"] == 1
    assert worker["forward_tokens"] == result["rank0_forward_tokens"] > 0
    assert worker["engines_started"] == len(result["scenarios"])
    assert worker["engines_open"] == 0
    assert "used_blocks" not in worker  # only rank 0 counts blocks; a worker holds KV tensors only


def test_abort_frees_blocks_on_every_rank(tp_run):
    result, model = tp_run
    got = result["scenarios"]["abort"]
    assert got["aborted"] and got["aborted_tokens"] >= script.ABORT["abort_after"]
    assert got["used_blocks_after_abort"] == 0 and got["used_blocks_after"] == 0
    # The requests after the abort need the whole pool, so they reuse the aborted request's blocks on every rank.
    assert got["tokens"] == reference(model, "abort")["tokens"]


def test_dead_rank_fails_requests_quickly(llama_run):
    result, _ = llama_run
    dead = result["dead_rank"]
    assert dead["finished"], "rank 0 hung after rank 1 died"
    assert dead["seconds"] < 60
    assert all(e and e.startswith("TensorParallelError") for e in dead["errors"]), dead["errors"]
    assert dead["later_error"] and "broken" in dead["later_error"]
    assert dead["used_blocks_after"] == 0


def test_spmd_wrap_generate_matches_transformers(qwen2_run):
    result, model = qwen2_run
    ids, mask = script.spmd_inputs()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=script.SPMD_NEW_TOKENS, do_sample=False)
    assert result["spmd_sequences"] == want.tolist()
    # rank 1's generate returned rank 0's result
    assert result["rank1"]["spmd_sequences"] == result["spmd_sequences"]


# ---- the command line on SmolLM2 ------------------------------------------------------------------------------------
CLI_PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]
CLI_TOKENS = 24


def test_torchrun_cli_generate_smollm2(smollm2):
    _require_gloo()
    from hf_paged import LLMEngine, SamplingParams
    from hf_paged.models import default_model_dir

    default_model_dir()  # converted once here, before two ranks would both convert it
    proc = torchrun(["-m", "hf_paged.cli", "generate", *CLI_PROMPTS, "--max-tokens", str(CLI_TOKENS),
                     "--temperature", "0", "--no-progress", "--kv-memory", "64MiB"], "cli_smollm2")
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    model, tokenizer = smollm2
    with LLMEngine(model, tokenizer, memory_bytes=64 << 20) as engine:
        want = engine.generate(CLI_PROMPTS, SamplingParams(max_new_tokens=CLI_TOKENS, temperature=0.0),
                               use_tqdm=False)
    assert [r["prompt"] for r in records] == CLI_PROMPTS
    assert [r["text"] for r in records] == [w.text for w in want]
    assert [r["completion_tokens"] for r in records] == [len(w.token_ids) for w in want]


# ---- in process: the plan, the head check, the loading plan ----------------------------------------------------------
def test_plan_for_a_sharded_model():
    from hf_paged.execution.plan import build_plan

    plan = build_plan("cpu", torch.float32, tensor_parallel=True)
    assert plan.linears == "torch" and not plan.fused_layers and not plan.compiled and not plan.cuda_graphs
    for option in ("pack_weights", "fuse_layers", "compile"):
        with pytest.raises(ValueError, match=option):
            build_plan("cpu", torch.float32, tensor_parallel=True, **{option: True})


def test_heads_that_do_not_split_are_refused(tmp_path, monkeypatch):
    from hf_paged import LLMEngine, distributed
    from hf_paged.config import EngineConfig
    from hf_paged.execution.kv_cache import model_kv_cache
    from hf_paged.execution.plan import build_plan

    model = build_tiny_model("llama", tmp_path)  # 4 query heads, 2 KV heads of 16
    attention = model.model.layers[0].self_attn
    monkeypatch.setattr(distributed, "tensor_parallel_size", lambda m: 2)
    assert distributed.executor_class(model) is distributed.TensorParallelExecutor
    # what 2 ranks hold of it: half the rows of q/k/v -> one KV head per rank, and a KV cache of that one head
    attention.q_proj.weight = torch.nn.Parameter(attention.q_proj.weight[:32])
    attention.k_proj.weight = torch.nn.Parameter(attention.k_proj.weight[:16])
    heads = distributed.local_kv_heads(model, 4, 2, 16)
    assert heads == 1
    kv_cache = model_kv_cache(model, num_blocks=4, num_kv_heads=heads)
    assert kv_cache.num_kv_heads == 1 and kv_cache.kv.shape == (model.config.num_hidden_layers, 2, 5, 16, 1, 16)
    # a shard of 1.5 heads (as transformers' row split gives 3 KV heads over 2 ranks): refused before any KV tensor
    # or control channel is made, by the executor and so by the engine
    attention.k_proj.weight = torch.nn.Parameter(attention.k_proj.weight[:8])
    refusal = r"model: .*splits attention heads.*World sizes that split the heads evenly: 1, 2"
    with pytest.raises(ValueError, match=refusal):
        distributed.local_kv_heads(model, 4, 2, 16)
    with pytest.raises(ValueError, match=refusal):
        distributed.TensorParallelExecutor(model, EngineConfig(num_blocks=4),
                                           build_plan("cpu", torch.float32, tensor_parallel=True))
    with pytest.raises(ValueError, match=refusal):
        LLMEngine(model, None, num_blocks=4)
    assert distributed._channel is None


def test_loading_plan_replicates_attention_when_heads_do_not_split():
    from transformers import AutoConfig

    from hf_paged.distributed import tensor_parallel_plan, valid_world_sizes
    from hf_paged.models import default_model_dir

    assert valid_world_sizes(9, 3) == [1, 3] and valid_world_sizes(32, 8) == [1, 2, 4, 8]
    config = AutoConfig.from_pretrained(default_model_dir())  # SmolLM2: 9 query heads, 3 KV heads
    assert tensor_parallel_plan(config, 3) == "auto"
    plan = tensor_parallel_plan(config, 2)
    assert plan == {f"model.layers.*.self_attn.{p}": "replicate" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
