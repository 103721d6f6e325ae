"""What each layer keeps per sequence, and the groups of layers that share one kind of bookkeeping.

A layer's state is one of: paged K/V over the whole prefix (``FullAttentionSpec``), paged K/V of which attention reads
only the last ``window`` positions (``SlidingWindowSpec``), or a fixed-size recurrent state per sequence
(``RecurrentStateSpec``: Mamba-style layers, not paged). Layers with equal specs form one ``KVCacheGroup``; the
``KVCacheManager`` keeps the block tables of the paged groups (one table per sequence serves every paged group: where
every group is sliding, the blocks behind the smallest window go back to the pool as the sequence advances; a model
that mixes full and sliding layers keeps its whole prefix, which attention masks) and refuses groups it cannot keep.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FullAttentionSpec:
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class SlidingWindowSpec(FullAttentionSpec):
    window: int = 0


@dataclass(frozen=True)
class RecurrentStateSpec:
    state_numel: int


@dataclass(frozen=True)
class KVCacheGroup:
    spec: FullAttentionSpec | RecurrentStateSpec
    layers: tuple[int, ...]

    @property
    def paged(self) -> bool:
        return isinstance(self.spec, FullAttentionSpec)


def attention_groups(windows: dict[int, int | None], num_kv_heads: int, head_dim: int) -> list[KVCacheGroup]:
    """The groups of a model's K/V layers from their windows (``admission.layer_windows``: None for full attention)."""
    by_spec: dict[FullAttentionSpec, list[int]] = {}
    for layer, window in sorted(windows.items()):
        spec = (SlidingWindowSpec(num_kv_heads, head_dim, window) if window
                else FullAttentionSpec(num_kv_heads, head_dim))
        by_spec.setdefault(spec, []).append(layer)
    return [KVCacheGroup(spec, tuple(layers)) for spec, layers in by_spec.items()]
