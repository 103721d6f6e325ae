"""Fused forwards for Llama-style attention, MLP, RMSNorm and decoder-layer modules, used only inside engine forwards
(CPU): the same arithmetic in fewer ops (an eager decode step spends much of its time in small ops and their dispatch);
see "The CPU speed paths" in docs/architecture.md.

* attention: q/k/v from one packed GEMM (:class:`~hf_paged.execution.patches.linear.PackedGroup`), the rotary embedding
  and the cache write of k and v in one C call, paged attention, ``o_proj``;
* MLP: gate/up from one packed GEMM, ``silu(gate) * up`` in one C call, ``down_proj``; RMSNorm: one C call;
* decoder layer (its four parts all fused): their fused paths called directly, the residual add and the norm after it in
  one C call; a step of few rows (decodes, drafts being verified, short chunks) with every GEMM on hf_paged's linear
  kernels runs the whole layer as one C call (``kernels/csrc/llama_decode_layer.c``).

A module is recognised by its exact class (:data:`LLAMA_EQUIVALENT`) and, for attention, a layer without a sliding
window; everything else, and every call outside an engine forward, runs the class's own ``forward``. :func:`build_fused`
only builds the forwards; the runner installs them for its own forwards. Kernels: ``kernels/cpu_fused_ops.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.activations import SiLUActivation

from ...admission import layer_windows
from ..kernels import cpu_fused_ops, cpu_library
from ..kernels.dispatch import paged_attention
from .attention import ATTN_IMPLEMENTATION, paged_attention_layer
from .linear import AMX_MAX_ROWS, SMALL_MAX_ROWS, AmxWeight, PackedGroup, SmallRowsWeight, in_packed_call


# The transformers classes whose forward computes exactly what each fused path does: Llama's attention (q/k/v, rotary
# embedding of the whole head, causal attention at ``module.scaling``, o_proj), MLP (``down(silu(gate(x)) * up(x))``),
# RMSNorm (fp32 variance, ``weight * x``) and decoder layer (pre-norm residual blocks, no multipliers or extra norms).
# Exact classes only; tests/test_fused_layers.py checks each against modeling_llama's code.
LLAMA_EQUIVALENT = {
    "attention": ("llama.LlamaAttention", "arcee.ArceeAttention", "gemma.GemmaAttention", "granite.GraniteAttention",
                  "granitemoe.GraniteMoeAttention", "granitemoeshared.GraniteMoeSharedAttention",
                  "hyperclovax.HyperCLOVAXAttention", "jais2.Jais2Attention", "qwen2_moe.Qwen2MoeAttention",
                  "solar_open.SolarOpenAttention"),
    "mlp": ("llama.LlamaMLP", "mistral.MistralMLP", "ministral.MinistralMLP", "ministral3.Ministral3MLP",
            "qwen2.Qwen2MLP", "qwen2_moe.Qwen2MoeMLP", "qwen3.Qwen3MLP", "qwen3_moe.Qwen3MoeMLP", "smollm3.SmolLM3MLP",
            "granite.GraniteMLP", "hyperclovax.HyperCLOVAXMLP", "olmo.OlmoMLP", "olmo2.Olmo2MLP", "olmo3.Olmo3MLP",
            "olmoe.OlmoeMLP", "cohere.CohereMLP", "cohere2.Cohere2MLP", "exaone4.Exaone4MLP", "helium.HeliumMLP",
            "deepseek_v2.DeepseekV2MLP", "deepseek_v3.DeepseekV3MLP", "glm4_moe.Glm4MoeMLP", "ernie4_5.Ernie4_5MLP",
            "solar_open.SolarOpenMLP", "stablelm.StableLmMLP", "mellum.MellumMLP"),
    "rms_norm": ("llama.LlamaRMSNorm", "mistral.MistralRMSNorm", "ministral.MinistralRMSNorm",
                 "ministral3.Ministral3RMSNorm", "mixtral.MixtralRMSNorm", "qwen2.Qwen2RMSNorm",
                 "qwen2_moe.Qwen2MoeRMSNorm", "qwen3.Qwen3RMSNorm", "qwen3_moe.Qwen3MoeRMSNorm",
                 "smollm3.SmolLM3RMSNorm", "granite.GraniteRMSNorm", "granitemoe.GraniteMoeRMSNorm",
                 "granitemoeshared.GraniteMoeSharedRMSNorm", "hyperclovax.HyperCLOVAXRMSNorm", "olmoe.OlmoeRMSNorm",
                 "phi3.Phi3RMSNorm", "exaone4.Exaone4RMSNorm", "deepseek_v2.DeepseekV2RMSNorm",
                 "deepseek_v3.DeepseekV3RMSNorm", "glm4.Glm4RMSNorm", "glm4_moe.Glm4MoeRMSNorm",
                 "ernie4_5.Ernie4_5RMSNorm", "seed_oss.SeedOssRMSNorm", "solar_open.SolarOpenRMSNorm",
                 "arcee.ArceeRMSNorm", "mellum.MellumRMSNorm"),
    "decoder_layer": ("llama.LlamaDecoderLayer", "arcee.ArceeDecoderLayer", "jais2.Jais2DecoderLayer",
                      "solar_open.SolarOpenDecoderLayer", "mistral.MistralDecoderLayer",
                      "ministral.MinistralDecoderLayer", "qwen2.Qwen2DecoderLayer", "qwen3.Qwen3DecoderLayer",
                      "smollm3.SmolLM3DecoderLayer", "seed_oss.SeedOssDecoderLayer"),
}
_EQUIVALENT_CLASSES = {kind: {"transformers.models.{0}.modeling_{0}.{1}".format(*name.split(".")) for name in names}
                       for kind, names in LLAMA_EQUIVALENT.items()}


def _llama_equivalent(module: torch.nn.Module, kind: str) -> bool:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}" in _EQUIVALENT_CLASSES[kind]


def _rotary_tables(position_embeddings: tuple, dtype: torch.dtype, tokens: int,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(cos, sin) ``[T, head_dim]`` of the step, and whether the C rotary kernels can read them (contiguous, in the
    activations' dtype)."""
    cos, sin = position_embeddings[0][0], position_embeddings[1][0]
    usable = cos.dtype == dtype and cos.is_contiguous() and sin.is_contiguous() and cos.shape == (tokens, head_dim)
    return cos, sin, usable


def _plain_linears(module: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Linear] | None:
    linears = [getattr(module, n, None) for n in names]
    if not all(type(m) is torch.nn.Linear for m in linears):
        return None
    if len({(m.in_features, m.weight.dtype, m.weight.device, m.bias is None) for m in linears}) != 1:
        return None
    return linears


class _Fused:
    """Base of the fused forwards: the module, its packed group (if any) and the layers in that group."""

    names: tuple[str, ...] = ()

    def __init__(self, module: torch.nn.Module, previous: "_Fused | None", kind: str) -> None:
        self.module = module
        self.lib = cpu_library.load()  # build_fused builds nothing where it is None
        self.bf16 = int(next(module.parameters()).dtype == torch.bfloat16)
        self.linears: list[torch.nn.Linear] = []
        self.group: PackedGroup | None = None
        if self.names:
            self.linears = _plain_linears(module, self.names)
            kept = previous.group if previous is not None else None
            self.group = kept if kept is not None and kept.current(self.linears) else PackedGroup(self.linears, kind)

    def is_current(self) -> bool:
        """Whether its packed group still holds its layers' weights."""
        return self.group is None or self.group.current(self.linears)

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)


class _FusedAttention(_Fused):
    names = ("q_proj", "k_proj", "v_proj")

    @staticmethod
    def matches(module: torch.nn.Module, windows: dict[int, int | None]) -> bool:
        """A Llama-equivalent attention in a layer without a sliding window (the fused path attends causally)."""
        layer = getattr(module, "layer_idx", None)
        return (_llama_equivalent(module, "attention") and isinstance(layer, int) and layer in windows
                and windows[layer] is None and _plain_linears(module, _FusedAttention.names) is not None)

    def __call__(self, hidden_states: torch.Tensor, position_embeddings: tuple | None = None,
                 attention_mask: torch.Tensor | None = None, past_key_values: Any = None, **kwargs: Any):
        meta = kwargs.get("paged_metadata")
        if not (meta is not None and past_key_values is None and position_embeddings is not None
                and in_packed_call() and self.usable(hidden_states)):
            return self.original(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        return self.fast(hidden_states, position_embeddings, meta), None

    def usable(self, hidden_states: torch.Tensor) -> bool:
        return (hidden_states.dim() == 3 and hidden_states.shape[0] == 1 and hidden_states.dtype == self.group.dtype
                and self.module.config._attn_implementation == ATTN_IMPLEMENTATION)

    def caches_for_c_write(self, meta: Any, dtype: torch.dtype, kv_heads: int,
                           head_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's (key, value) caches where the C kernels may write them directly, else None."""
        layer = self.module.layer_idx
        key_cache, value_cache = meta.kv_cache.key_cache(layer), meta.kv_cache.value_cache(layer)
        if (key_cache.dtype == dtype and key_cache.is_contiguous() and value_cache.is_contiguous()
                and key_cache.shape[2:] == (kv_heads, head_dim) and meta.slot_mapping.dtype == torch.int64
                and meta.plan is not None and meta.plan.cache_write == "c"):
            return key_cache, value_cache
        return None

    def fast(self, hidden_states: torch.Tensor, position_embeddings: tuple, meta: Any) -> torch.Tensor:
        """The engine's attention for hidden states ``[1, T, D]``: packed q/k/v GEMM, rotary embedding and the
        cache write in one C call, paged attention, ``o_proj``."""
        m = self.module
        tokens = hidden_states.shape[1]
        hd = m.head_dim
        q_width, kv_width = m.q_proj.out_features, m.k_proj.out_features
        qkv = self.group.matmul(hidden_states)[0]
        q = qkv[:, :q_width].view(tokens, -1, hd)
        k = qkv[:, q_width:q_width + kv_width].view(tokens, -1, hd)
        v = qkv[:, q_width + kv_width:].view(tokens, -1, hd)
        cos, sin, rope_ok = _rotary_tables(position_embeddings, q.dtype, tokens, hd)
        caches = self.caches_for_c_write(meta, q.dtype, k.shape[1], hd) if rope_ok else None
        if caches is not None:
            # Rotary embedding and the cache write in one call; then attention over the blocks.
            key_cache, value_cache = caches
            meta.mark_layer(m.layer_idx)
            q_rot = torch.empty(q.shape, dtype=q.dtype)
            self.lib.hf_rope_write_kv(q.data_ptr(), q.stride(0), q.stride(1), q.shape[1], k.data_ptr(), k.stride(0),
                                      k.stride(1), k.shape[1], v.data_ptr(), v.stride(0), v.stride(1),
                                      q_rot.data_ptr(), cos.data_ptr(), sin.data_ptr(), meta.slot_mapping.data_ptr(),
                                      key_cache.data_ptr(), value_cache.data_ptr(), tokens, hd, self.bf16)
            out = paged_attention(q_rot, key_cache, value_cache, meta, float(m.scaling))
            return m.o_proj.forward(out.view(1, tokens, -1))
        rotated = cpu_fused_ops.rope(q, k, cos, sin) if rope_ok else None
        q, k = rotated if rotated is not None else cpu_fused_ops.rope_reference(q, k, cos, sin)
        out = paged_attention_layer(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2),
                                    v.unsqueeze(0).transpose(1, 2), meta, m.layer_idx, float(m.scaling), None, None)
        return m.o_proj.forward(out.reshape(1, tokens, -1))  # .forward: its packed weight, no hook machinery


class _FusedMLP(_Fused):
    names = ("gate_proj", "up_proj")

    @staticmethod
    def matches(module: torch.nn.Module, windows: dict[int, int | None]) -> bool:
        return (_llama_equivalent(module, "mlp")
                and type(getattr(module, "act_fn", None)) in (SiLUActivation, torch.nn.SiLU)
                and _plain_linears(module, _FusedMLP.names) is not None
                and isinstance(getattr(module, "down_proj", None), torch.nn.Module))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not (in_packed_call() and x.dtype == self.group.dtype and x.device.type == "cpu"):
            return self.original(x)
        return self.fast(x)

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """Packed gate/up GEMM, ``silu(gate) * up`` in C, ``down_proj``."""
        gate_up = self.group.matmul(x)
        inter = gate_up.shape[-1] // 2
        act = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype)
        self.lib.hf_silu_mul(gate_up.data_ptr(), 2 * inter, act.data_ptr(), inter, act.numel() // inter, inter,
                             self.bf16)
        return self.module.down_proj.forward(act)


class _FusedRMSNorm(_Fused):
    @staticmethod
    def matches(module: torch.nn.Module, windows: dict[int, int | None]) -> bool:
        return (_llama_equivalent(module, "rms_norm")
                and isinstance(getattr(module, "weight", None), torch.Tensor)
                and isinstance(getattr(module, "variance_epsilon", None), float))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if in_packed_call():
            out = cpu_fused_ops.rms_norm(x, self.module.weight, self.module.variance_epsilon)
            if out is not None:
                return out
        return self.original(x)


class _OneCallStep:
    """What the one-call layers of a step share (``hf_decode_step_t``: the decode and chunk sequences, slots,
    rotary tables, one workspace; and an output per layer, allocated together), built by the first layer and kept on
    the step's metadata; ``struct`` is None where the step cannot run its layers as one call."""

    def __init__(self, key: tuple, position_embeddings: tuple) -> None:
        self.key, self.position_embeddings = key, position_embeddings
        self.struct, self.shape, self.outs, self.keep = None, None, (), ()


class _FusedDecoderLayer(_Fused):
    """A Llama decoder layer whose four parts are all fused: it calls their fused paths directly and does the residual
    add with the post-attention norm in one C call. A step of few rows whose linears run on hf_paged's kernels runs the
    whole layer as one C call (``one_call``) on two argument structs: the layer's, built on its first such call, and the
    step's, built by the step's first layer."""

    PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")

    def __init__(self, module: torch.nn.Module, parts: dict, one_call: bool) -> None:
        super().__init__(module, None, False)
        self.attention, self.mlp = parts[module.self_attn], parts[module.mlp]
        # The o_proj / down_proj packers (for the one-call layer), or None.
        self.o_packer, self.down_packer = parts.get(module.self_attn.o_proj), parts.get(module.mlp.down_proj)
        self.one_call = one_call
        self._layer: tuple = (None, None, None)  # (KV cache, dtype, its one-call arguments or None) of the last call

    @classmethod
    def matches(cls, module: torch.nn.Module, parts: dict) -> bool:
        """Whether ``module`` is a Llama decoder layer whose four parts have fused forwards in ``parts``."""
        found = [getattr(module, n, None) for n in cls.PARTS]
        return (_llama_equivalent(module, "decoder_layer")
                and all(isinstance(p, torch.nn.Module) for p in found)
                and [type(parts.get(p)) for p in found] == [_FusedAttention, _FusedMLP, _FusedRMSNorm, _FusedRMSNorm]
                and len({p.weight.dtype for p in found[2:]} | {parts[found[0]].group.dtype}) == 1)

    def is_current(self) -> bool:
        return self.attention.is_current() and self.mlp.is_current()

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = False,
                 position_embeddings: tuple | None = None, **kwargs: Any) -> torch.Tensor:
        meta = kwargs.get("paged_metadata")
        if self.one_call and meta is not None and past_key_values is None:
            out = self._decode_in_one_call(hidden_states, position_embeddings, meta)
            if out is not None:
                return out
        m = self.module
        if not (meta is not None and past_key_values is None and position_embeddings is not None
                and in_packed_call() and self.attention.usable(hidden_states) and hidden_states.is_contiguous()):
            return self.original(hidden_states, attention_mask, position_ids, past_key_values, use_cache,
                                 position_embeddings, **kwargs)
        lib, bf16 = self.lib, self.bf16
        rows, dim = hidden_states.numel() // hidden_states.shape[-1], hidden_states.shape[-1]
        pre, post = m.input_layernorm, m.post_attention_layernorm
        normed = torch.empty_like(hidden_states)
        lib.hf_rms_norm(hidden_states.data_ptr(), dim, pre.weight.data_ptr(), normed.data_ptr(), dim, rows, dim,
                        pre.variance_epsilon, bf16)
        attended = self.attention.fast(normed, position_embeddings, meta)
        residual = torch.empty_like(hidden_states)
        lib.hf_add_rms_norm(hidden_states.data_ptr(), attended.data_ptr(), post.weight.data_ptr(), residual.data_ptr(),
                            normed.data_ptr(), rows, dim, post.variance_epsilon, bf16)
        return residual.add_(self.mlp.fast(normed))

    def _one_call_layer(self, meta: Any, dtype: torch.dtype) -> Any:
        """This layer's ``hf_llama_layer_t`` (packed weights, biases, norms, geometry, its caches) and what checks it,
        worked out once per KV cache and dtype; None where the layer cannot run as one call."""
        m = self.module
        attn, mlp, pre, post = m.self_attn, m.mlp, m.input_layernorm, m.post_attention_layernorm
        qkv, gate_up = self.attention.group, self.mlp.group
        if self.o_packer is None or self.down_packer is None or dtype != qkv.dtype:
            return None
        packs = (qkv.packed, self.o_packer.packed, gate_up.packed, self.down_packer.packed)
        biases = (qkv.bias, attn.o_proj.bias, gate_up.bias, mlp.down_proj.bias)
        if all(isinstance(p, AmxWeight) for p in packs) and dtype == torch.bfloat16:
            kind, max_rows = cpu_library.CONSTANTS["HF_LINEAR_AMX"], AMX_MAX_ROWS
        elif all(isinstance(p, SmallRowsWeight) and p.dtype == dtype for p in packs):
            kind, max_rows = cpu_library.CONSTANTS["HF_LINEAR_SMALL"], SMALL_MAX_ROWS
        else:
            return None
        hd, layer = attn.head_dim, attn.layer_idx
        heads, kv_heads = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        key_scales, value_scales = meta.kv_cache.key_scales(layer), meta.kv_cache.value_scales(layer)
        cache_dtype = dtype if key_scales is None else torch.int8  # int8 K/V: quantized by the C write
        caches = self.attention.caches_for_c_write(meta, cache_dtype, kv_heads, hd)  # where the plan writes in C
        if caches is None or not all(b is None or (b.dtype == dtype and b.is_contiguous()) for b in biases):
            return None
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        structs = cpu_library.STRUCTS
        attention = structs["hf_attention_t"](
            key_cache=ptr(caches[0]), value_cache=ptr(caches[1]), key_scales=ptr(key_scales),
            value_scales=ptr(value_scales), H=heads, KVH=kv_heads, hd=hd, block_size=caches[0].shape[1],
            scale=float(attn.scaling), bf16=self.bf16)
        dim, inter = pre.weight.shape[0], gate_up.packed.out_features // 2
        weights = {f"{name}_{part}": ptr(t) for name, p, b in zip(("qkv", "o", "gate_up", "down"), packs, biases)
                   for part, t in (("w", p.packed), ("b", b))}
        struct = structs["hf_llama_layer_t"](
            attn=attention, norm1_w=pre.weight.data_ptr(), norm2_w=post.weight.data_ptr(), eps1=pre.variance_epsilon,
            eps2=post.variance_epsilon, D=dim, I=inter, linear_kind=kind, **weights)
        per_token = self.lib.hf_llama_decode_layer_workspace(struct, 1)  # linear in T
        # What a step's arguments must be built for: activations' dtype and shape, query, workspace, kernel rows.
        key = (dtype, dim, heads, hd, per_token, max_rows)
        return struct, key, layer, (caches[0], caches[1], key_scales, value_scales, float(attn.scaling))

    def _one_call_step(self, meta: Any, hidden_states: torch.Tensor, position_embeddings: tuple,
                       layer: tuple) -> _OneCallStep:
        """The step's ``hf_decode_step_t``, built once for the layers whose arguments ``layer[1]`` describes."""
        struct, key, _, (key_cache, value_cache, key_scales, value_scales, scale) = layer
        dtype, dim, heads, hd, per_token, max_rows = key
        step = meta.c_step = _OneCallStep(key, position_embeddings)
        tokens = hidden_states.shape[1] if hidden_states.dim() == 3 else 0
        if not (0 < tokens <= max_rows and position_embeddings is not None
                and meta.slot_mapping.dtype == torch.int64  # the C cache write reads int64 slots
                and self.attention.module.config._attn_implementation == ATTN_IMPLEMENTATION):
            return step
        cos, sin = position_embeddings[0], position_embeddings[1]  # [1, T, hd]: row 0 is where they start
        if not (cos.dtype == dtype and cos.is_contiguous() and sin.is_contiguous() and cos.shape == (1, tokens, hd)):
            return step
        work = torch.empty(tokens * per_token, dtype=dtype)  # one workspace for all of the step's layers
        query = work[: tokens * heads * hd].view(tokens, heads, hd)  # for the plan's shape and dtype checks
        decodes = meta.cpu_decode_plan(query, key_cache, value_cache, scale, None, None, key_scales,
                                       value_scales) if meta.num_decodes else None
        chunks = meta.cpu_prefill_plan(query, key_cache, value_cache, scale, None, None, key_scales, value_scales)
        if (decodes is not None or not meta.num_decodes) and (chunks is not None or meta.num_decodes == meta.num_seqs):
            none = cpu_library.STRUCTS["hf_seqs_t"](num_seqs=0)
            step.struct = cpu_library.STRUCTS["hf_decode_step_t"](
                seqs=decodes.seqs if decodes else none, chunks=chunks.seqs if chunks else none,
                slots=meta.slot_mapping.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(), T=tokens,
                work=work.data_ptr(), num_threads=torch.get_num_threads())
            step.shape, step.keep = torch.Size((1, tokens, dim)), (decodes, chunks, work, meta.slot_mapping)
            # One tensor per layer (never one layer's output overwritten by another's), in one allocation.
            step.outs = torch.empty((meta.kv_cache.num_layers, 1, tokens, dim), dtype=dtype).unbind(0)
        return step

    def _decode_in_one_call(self, hidden_states: torch.Tensor, position_embeddings: tuple,
                            meta: Any) -> torch.Tensor | None:
        """The whole layer as one C call (``csrc/llama_decode_layer.c``: the same kernels in the same order, without the
        Python between them); None where that does not apply."""
        cache, dtype, layer = self._layer
        if cache is not meta.kv_cache or dtype != hidden_states.dtype:
            layer = self._one_call_layer(meta, hidden_states.dtype)
            self._layer = (meta.kv_cache, hidden_states.dtype, layer)
        if layer is None:
            return None
        step = meta.c_step
        if step is None or step.position_embeddings is not position_embeddings or step.key != layer[1]:
            step = self._one_call_step(meta, hidden_states, position_embeddings, layer)
        if not (step.struct is not None and hidden_states.shape == step.shape and hidden_states.is_contiguous()
                and in_packed_call()):
            return None
        out = step.outs[layer[2]]
        if self.lib.hf_llama_decode_layer(layer[0], step.struct, hidden_states.data_ptr(), out.data_ptr()) != 0:
            return None
        meta.mark_layer(layer[2])
        return out


_KINDS = (_FusedAttention, _FusedMLP, _FusedRMSNorm)


def build_fused(model: torch.nn.Module, linears: str, previous: dict | None = None
                ) -> tuple[dict[torch.nn.Module, _Fused], list[torch.nn.Linear]]:
    """A fused forward for every recognised CPU attention, MLP, RMSNorm and decoder-layer module of ``model`` (keeping
    ``previous``'s packed groups that still hold the weights), and the linears now computed through packed groups. Empty
    without the C kernels or oneDNN. Modules with a ``forward`` of their own are left alone; installs nothing."""
    if not (cpu_library.loaded() and torch.backends.mkldnn.is_available()):
        return {}, []
    previous = previous or {}
    windows = layer_windows(model)
    fused: dict[torch.nn.Module, _Fused] = {}
    grouped: list[torch.nn.Linear] = []
    with torch.inference_mode():
        for module in model.modules():
            if "forward" in module.__dict__:
                continue  # a forward somebody else put there
            weight = next(module.parameters(), None)
            if weight is None or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
                continue
            for kind in _KINDS:
                if kind.matches(module, windows):
                    old = previous.get(module)
                    fused[module] = kind(module, old if type(old) is kind else None, linears)
                    grouped.extend(fused[module].linears)
                    break
    return fused, grouped


def fuse_decoder_layers(model: torch.nn.Module, parts: dict, one_call: bool) -> dict[torch.nn.Module, _Fused]:
    """Fused forwards for the decoder layers whose four parts all have theirs in ``parts`` (fused modules and packed
    linears by module); ``one_call``: see :class:`_FusedDecoderLayer`."""
    layers = {}
    for module in model.modules():
        if "forward" not in module.__dict__ and _FusedDecoderLayer.matches(module, parts):
            layers[module] = _FusedDecoderLayer(module, parts, one_call)
    return layers
