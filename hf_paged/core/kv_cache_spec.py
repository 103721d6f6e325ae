"""What each layer keeps per sequence, and the groups of layers that share one kind of bookkeeping.

A layer's state is one of: paged K/V over the whole prefix (``FullAttentionSpec``), paged K/V of which attention reads
only the last ``window`` positions (``SlidingWindowSpec``), or a fixed-size recurrent state per sequence
(``RecurrentStateSpec``: Mamba-style layers, not paged). Layers with equal specs form one ``KVCacheGroup``; the
``KVCacheManager`` keeps the block tables of the paged groups (one table per sequence serves every paged group: where
every paged group is sliding, the blocks behind the smallest window go back to the pool as the sequence advances; a
model that mixes full and sliding layers keeps its whole prefix, which attention masks) and one recurrent-state slot
per sequence for the recurrent groups.
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
    """A layer's state-space / linear-attention / short-convolution state: fixed size, one per sequence, not paged
    (its shape is the model's own, known to the runner once the layer first runs)."""


@dataclass(frozen=True)
class KVCacheGroup:
    spec: FullAttentionSpec | RecurrentStateSpec
    layers: tuple[int, ...]

    @property
    def paged(self) -> bool:
        return isinstance(self.spec, FullAttentionSpec)


def cache_groups(windows: dict[int, int | None], num_kv_heads: int, head_dim: int,
                 recurrent_layers: tuple[int, ...] = ()) -> list[KVCacheGroup]:
    """The groups of a model's layers: K/V layers from their windows (``admission.layer_windows``: None for full
    attention), then its recurrent layers (``admission.recurrent_mixers``)."""
    by_spec: dict[FullAttentionSpec, list[int]] = {}
    for layer, window in sorted(windows.items()):
        spec = (SlidingWindowSpec(num_kv_heads, head_dim, window) if window
                else FullAttentionSpec(num_kv_heads, head_dim))
        by_spec.setdefault(spec, []).append(layer)
    groups = [KVCacheGroup(spec, tuple(layers)) for spec, layers in by_spec.items()]
    if recurrent_layers:
        groups.append(KVCacheGroup(RecurrentStateSpec(), tuple(sorted(recurrent_layers))))
    return groups
