"""The small ops of a Llama-style decoder layer as one C call each (``csrc/fused_layer_ops.c``), with the
PyTorch code they stand for beside each (transformers' eager code: the reference the tests compare with).

Eager, a decode step spends more time in these ops' dispatch than in their arithmetic: an RMSNorm is 8 torch
ops, a rotary embedding of q and k 14, SiLU(gate) * up 2, on a few dozen rows. ``add_rms_norm`` is a decoder
layer's residual add and the norm after it; ``argmax_rows`` is greedy sampling's argmax. The C versions compute
the same values (rounding to bf16 where the torch ops round; see the C file for what is bit-exact) in one call.

Each function takes CPU tensors in fp32 or bf16 and returns None where its kernel does not apply (another
device or dtype, a strided last dim, no kernel library), so the caller runs the reference instead.
"""

from __future__ import annotations

import torch

from . import cpu_library

_DTYPES = (torch.float32, torch.bfloat16)


def _usable(*tensors: torch.Tensor) -> bool:
    dtype = tensors[0].dtype
    return (dtype in _DTYPES and all(t.device.type == "cpu" and t.dtype == dtype and t.stride(-1) == 1
                                     for t in tensors) and cpu_library.loaded())


def _call(name: str, *args) -> None:
    cpu_library.call_profiled(f"hf_paged::{name}", getattr(cpu_library.load(), name), args)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm.forward``."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``rms_norm_reference`` over the last dim of ``x`` (rows of any leading shape, the weight in ``x``'s
    dtype)."""
    if not (_usable(x, weight) and weight.dim() == 1 and weight.shape[0] == x.shape[-1] and weight.is_contiguous()):
        return None
    rows = x.reshape(-1, x.shape[-1])  # a view for rows with a uniform stride, else a copy
    out = torch.empty(x.shape, dtype=x.dtype)
    _call("hf_rms_norm", rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(), x.shape[-1],
          rows.shape[0], x.shape[-1], float(eps), int(x.dtype == torch.bfloat16))
    return out


def add_rms_norm_reference(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's ``residual = x + a`` and the RMSNorm of it: (residual, normed)."""
    residual = x + a
    return residual, rms_norm_reference(residual, weight, eps)


def add_rms_norm(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``add_rms_norm_reference`` for contiguous ``x`` and ``a`` of one shape."""
    if not (_usable(x, a, weight) and x.shape == a.shape and x.is_contiguous() and a.is_contiguous()
            and weight.dim() == 1 and weight.shape[0] == x.shape[-1] and weight.is_contiguous()):
        return None
    residual, out = torch.empty_like(x), torch.empty_like(x)
    _call("hf_add_rms_norm", x.data_ptr(), a.data_ptr(), weight.data_ptr(), residual.data_ptr(), out.data_ptr(),
          x.numel() // max(x.shape[-1], 1), x.shape[-1], float(eps), int(x.dtype == torch.bfloat16))
    return residual, out


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` for q ``[T, Hq, hd]``, k ``[T, Hk, hd]``, cos/sin ``[T, hd]``."""
    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``rope_reference`` into new contiguous tensors (q and k may be strided views of a projection's output)."""
    if not (_usable(q, k, cos, sin) and q.dim() == 3 and k.dim() == 3 and cos.dim() == 2
            and cos.shape == sin.shape == (q.shape[0], q.shape[2]) and k.shape[0] == q.shape[0]
            and k.shape[2] == q.shape[2] and q.shape[2] % 2 == 0 and cos.is_contiguous() and sin.is_contiguous()):
        return None
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype)
    _call("hf_rope", q.data_ptr(), q.stride(0), q.stride(1), q.shape[1], k.data_ptr(), k.stride(0), k.stride(1),
          k.shape[1], q_out.data_ptr(), k_out.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.shape[0], q.shape[2],
          int(q.dtype == torch.bfloat16))
    return q_out, k_out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with ``gate_up = cat(gate, up)`` on the last dim (transformers' ``LlamaMLP``)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """``silu_mul_reference``."""
    if not (_usable(gate_up) and gate_up.shape[-1] % 2 == 0):
        return None
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    inter = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype)
    _call("hf_silu_mul", rows.data_ptr(), rows.stride(0), out.data_ptr(), inter, rows.shape[0], inter,
          int(gate_up.dtype == torch.bfloat16))
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor | None:
    """``x.max(dim=-1).indices`` of a 2-D fp32 CPU tensor (the first maximum of each row, or its first NaN), in
    one C call: greedy sampling over the vocabulary."""
    if not (x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(1) == 1
            and cpu_library.loaded()):
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _call("hf_argmax_rows", x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr())
    return out
