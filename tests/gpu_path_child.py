"""The CUDA path of the engine, run on the CPU (``tests/test_gpu_path.py`` runs this in a fresh interpreter with
``TRITON_INTERPRET=1``: triton must be imported in interpreter mode, before transformers imports it).

For a GQA Llama and a Gemma2 (sliding window, soft-capping), fp32, the engine with the Triton kernels (interpreted):

* eager engine greedy tokens == HF ``generate`` (the oracle) token for token;
* the same engine with decode graphs (``DecodeGraphs`` with ``EagerGraphStandIn`` for capture/replay) gives the
  same tokens; graphs were captured at padded sizes and replayed; every graph step leaves the KV cache's blocks
  that are neither the step's sequences' own nor the null block bit-identical, and the static buffers' padded rows
  point at the null block;
* no host synchronisation inside any forward (eager or graph): ``Tensor.item/tolist/cpu/numpy/nonzero``,
  ``bool/int/float/index`` of a tensor, ``torch.tensor``/``as_tensor`` and ``torch.cuda.synchronize`` are counted
  while a forward runs, except where the Triton interpreter itself (which executes the kernels on the host) calls
  them.

Prints one ``OK <name>`` line per model; exits non-zero on any failure.
"""

from __future__ import annotations

import os
import sys
import threading

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
os.environ["HF_PAGED_FORCE_TRITON"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402,F401
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from hf_paged import LLMEngine, SamplingParams  # noqa: E402
from hf_paged.execution.cuda_graphs import DecodeGraphs, EagerGraphStandIn, padded_batch_size  # noqa: E402

TRITON_DIR = os.path.dirname(triton.__file__)


class HostSyncCounter:
    """Counts calls that would synchronise with the GPU, made while ``active`` (set around forwards)."""

    TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")
    TORCH_FUNCTIONS = ("tensor", "as_tensor", "nonzero")

    def __init__(self) -> None:
        self.local = threading.local()
        self.calls: list[str] = []
        self._saved: list[tuple[object, str, object]] = []

    @property
    def active(self) -> bool:
        return getattr(self.local, "active", False)

    @active.setter
    def active(self, value: bool) -> None:
        self.local.active = value

    def _from_triton(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename.startswith(TRITON_DIR):
                return True
            frame = frame.f_back
        return False

    def _wrap(self, owner: object, name: str) -> None:
        original = getattr(owner, name)
        counter = self

        def counted(*args, **kwargs):
            if counter.active and not counter._from_triton():
                caller = sys._getframe(1)
                counter.calls.append(f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return original(*args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, counted)

    def install(self) -> None:
        for name in self.TENSOR_METHODS:
            self._wrap(torch.Tensor, name)
        for name in self.TORCH_FUNCTIONS:
            self._wrap(torch, name)
        self._wrap(torch.cuda, "synchronize")

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def watch(self, model: torch.nn.Module) -> None:
        def before(*_):
            self.active = True

        def after(*_):
            self.active = False

        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)


COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": AutoConfig.for_model("llama", **COMMON),
    "gemma2": AutoConfig.for_model("gemma2", head_dim=16, sliding_window=6, attn_logit_softcapping=50.0,
                                   final_logit_softcapping=30.0, query_pre_attn_scalar=16, **COMMON),
}


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_model(name: str, counter: HostSyncCounter) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name], attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 17, 9)]
    new_tokens = [7, 3, 5]  # the batch shrinks 3 -> 2 -> 1: graphs of sizes 4 (one padded row), 2 and 1
    expected = [hf_greedy(model, p, n) for p, n in zip(prompts, new_tokens)]
    # min = max: EOS banned until the last token, exactly as HF generate's min_new_tokens does.
    params = [SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0) for n in new_tokens]
    counter.watch(model)
    kwargs = dict(num_blocks=40, block_size=4, max_num_seqs=4)

    with LLMEngine(model, None, **kwargs) as engine:
        counter.calls.clear()  # the engine's start-up probe compares with a plain HF forward, which does sync
        assert engine.plan.triton and not engine.plan.cuda_graphs, engine.plan
        eager = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    assert eager == expected, (name, eager, expected)

    with LLMEngine(model, None, **kwargs) as engine:
        counter.calls.clear()
        stand_in = EagerGraphStandIn()
        graphs = engine.runner.decode_graphs = DecodeGraphs(engine.runner, 4, engine.max_model_len, stand_in)
        assert graphs.sizes == [1, 2, 4], graphs.sizes
        pool, kv_cache = engine.pool, engine.kv_cache
        assert kv_cache.null_block == pool.null_block and kv_cache.block_size == pool.block_size
        graph_steps: list[int] = []
        real_execute = graphs.execute

        def checked_execute(step):
            own = {b for seq in step.seqs for b in seq.block_ids}
            before = kv_cache.kv.clone()
            out = real_execute(step)
            n = len(step.seqs)
            graph_steps.append(n)
            untouched = [b for b in range(kv_cache.num_blocks) if b not in own]
            assert torch.equal(kv_cache.kv[:, :, untouched], before[:, :, untouched]), "a padded row wrote a block"
            size = padded_batch_size(n, graphs.sizes)
            null = kv_cache.null_block
            assert (graphs.block_tables[n:size] == null).all()
            assert (graphs.slot_mapping[n:size] == null * kv_cache.block_size).all()
            assert (graphs.kv_lens[n:size] == 1).all() and (graphs.input_ids[0, n:size] == 0).all()
            for row, seq in enumerate(step.seqs):
                blocks = seq.block_ids
                assert graphs.block_tables[row, : len(blocks)].tolist() == blocks
                assert (graphs.block_tables[row, len(blocks):] == null).all()
            return out

        graphs.execute = checked_execute
        with_graphs = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
        assert with_graphs == eager, (name, with_graphs, eager)
        assert sorted(set(graph_steps)) == [1, 2, 3], graph_steps  # 3 rows run padded to 4
        assert stand_in.captures == 3 and stand_in.replays == len(graph_steps), (stand_in.captures, graph_steps)
    assert not counter.calls, f"host synchronisation inside a forward: {counter.calls[:10]}"
    print("OK", name, eager[0], flush=True)


def main() -> None:
    counter = HostSyncCounter()
    counter.install()
    try:
        for name in CONFIGS:
            check_model(name, counter)
    finally:
        counter.uninstall()


if __name__ == "__main__":
    main()
