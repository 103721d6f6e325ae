"""The small ops of a Llama-style decoder layer as one C call each (``csrc/fused_layer_ops.c``), beside the
transformers code each stands for (the reference the tests compare with): RMSNorm, rotary embedding, and greedy
sampling's argmax; eager, these ops cost more in dispatch than in arithmetic. The fused layers call the residual
add + norm and SiLU(gate) * up kernels directly. Each function takes CPU tensors in fp32 or bf16 and returns None
where its kernel does not apply (another device or dtype, a strided last dim, no library): the caller then runs
the reference.
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


def argmax_rows(x: torch.Tensor) -> torch.Tensor | None:
    """``x.max(dim=-1).indices`` of a 2-D fp32 CPU tensor (the first maximum of each row, or its first NaN), in
    one C call: greedy sampling over the vocabulary."""
    if not (x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(1) == 1
            and cpu_library.loaded()):
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _call("hf_argmax_rows", x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr())
    return out
