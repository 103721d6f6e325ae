"""``PagedCache``: a ``transformers.Cache`` on the block pool, a drop-in for ``DynamicCache`` in HF ``generate``.

Each batch row owns a ``BlockTable``. On each step the first layer's ``update`` reserves the slots of the
row's new tokens (copy-on-write where a row shares a partial block) and builds the gather index once;
every layer then scatters its new K/V into those slots and returns the row's K/V read back from its blocks
(dense, with the length ``get_mask_sizes`` reports), so any attention implementation works unchanged.
``kv_cache_dtype="int8"`` stores the K/V quantized (see ``BlockPool``) and returns them dequantized to the model's
dtype.

Sharing: rows that ``generate`` expanded from one prompt (``num_beams``, ``num_return_sequences``) hold
identical K/V after the prefill; the cache detects that on the first layer and stores the prompt once,
the rows sharing its blocks. Beam search's ``reorder_cache`` forks block tables (reference counts) instead
of copying K/V; only a partial last block is ever copied, when a beam writes into it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..admission import cache_layer_windows, cache_refusal
from ..core.block_pool import BlockPool, BlockTable
from .kernels.cache_ops import gather_blocks
from .kernels.dispatch import write_kv
from .kv_cache import KVCache, model_kv_cache
from .plan import default_plan


class _PagedLayer(CacheLayerMixin):
    """The per-layer face transformers expects of a cache layer; the state lives in the PagedCache. A layer with a
    ``window`` (sliding or chunked, as transformers' ``DynamicCache`` sees it) shows the attention what a
    ``DynamicSlidingWindowLayer`` would: the last ``window - 1`` cached positions and the new ones."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, cache: "PagedCache", layer_idx: int, window: int | None) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.window = window

    @property
    def is_sliding(self) -> bool:
        return self.window is not None

    def visible_start(self, cached: int) -> int:
        """The first position the attention sees when ``cached`` positions were stored before this step."""
        return max(cached - self.window + 1, 0) if self.window else 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return self.cache.update(key_states, value_states, self.layer_idx)

    def get_seq_length(self) -> int:
        return self.cache.lengths[self.layer_idx]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        cached = self.get_seq_length()
        start = self.visible_start(cached)
        return cached - start + query_length, start

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:  # the cache reorders all layers at once
        pass

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


class PagedCache(Cache):
    """KV cache of one ``generate`` call: block tables on a ``BlockPool`` over a ``KVCache``'s tensors.

    Give the size as ``num_blocks`` or ``memory_bytes``, pass an existing ``kv_cache`` (with its ``pool`` to share
    both with other caches), or give neither: like ``DynamicCache``, the cache then grows on demand (it starts at
    ``INITIAL_BLOCKS`` blocks and doubles whenever a step needs more). ``kv_cache_dtype="int8"`` (for a cache of its
    own) stores K/V as int8 with scales. Call ``free()`` (or use it as a context manager) to return its blocks when
    the generation is over.
    """

    INITIAL_BLOCKS = 16

    def __init__(self, model: torch.nn.Module | None = None, *, kv_cache: KVCache | None = None,
                 pool: BlockPool | None = None, block_size: int = 16, num_blocks: int | None = None,
                 memory_bytes: int | None = None, share_identical_rows: bool = True,
                 kv_cache_dtype: str | None = None) -> None:
        self.growable = kv_cache is None and num_blocks is None and memory_bytes is None
        self._own_storage = kv_cache is None
        if kv_cache is None:
            if model is None:
                raise ValueError("model: PagedCache needs a model (to shape its KV cache) or a kv_cache")
            refusal = cache_refusal(model)
            if refusal is not None:
                raise ValueError(f"model: a PagedCache cannot hold this model's state ({refusal}); use HF's own "
                                 "cache")
            kv_cache = model_kv_cache(model, block_size=block_size, memory_bytes=memory_bytes,
                                      num_blocks=self.INITIAL_BLOCKS if self.growable else num_blocks,
                                      kv_cache_dtype=kv_cache_dtype or "auto")
        elif kv_cache_dtype is not None and kv_cache_dtype != kv_cache.kv_cache_dtype:
            raise ValueError(f"kv_cache_dtype: {kv_cache_dtype!r} differs from the given kv_cache's "
                             f"{kv_cache.kv_cache_dtype!r}")
        self.kv_cache = kv_cache
        if pool is not None and (pool.num_blocks, pool.block_size) != (kv_cache.num_blocks, kv_cache.block_size):
            raise ValueError(f"pool: {pool.num_blocks} blocks of {pool.block_size} do not match the kv_cache's "
                             f"{kv_cache.num_blocks} of {kv_cache.block_size}")
        self.pool = pool if pool is not None else BlockPool(kv_cache.num_blocks, kv_cache.block_size)
        self.plan = default_plan(kv_cache.kv, kv_cache.kv_cache_dtype)
        self.share_identical_rows = share_identical_rows
        windows = cache_layer_windows(model) if model is not None else []
        super().__init__(layers=[_PagedLayer(self, i, windows[i] if i < len(windows) else None)
                                 for i in range(kv_cache.num_layers)])
        self.rows: list[BlockTable] = []
        self.lengths = [0] * kv_cache.num_layers
        self._writers: torch.Tensor | None = None  # rows whose K/V this step are stored
        self._slots: torch.Tensor | None = None
        self._tables: torch.Tensor | None = None

    # ---- what generate calls -------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batch, kv_heads, q_len, head_dim = key_states.shape
        head_dim_v, kv = value_states.shape[-1], self.kv_cache
        shape = (kv_heads, head_dim, head_dim_v)
        if shape != (kv.num_kv_heads, kv.head_dim, kv.head_dim_v) and self._own_storage and not self.rows \
                and value_states.shape[:3] == key_states.shape[:3]:
            kv = self._reshape_storage(*shape)
        if shape != (kv.num_kv_heads, kv.head_dim, kv.head_dim_v) or value_states.shape[:3] != key_states.shape[:3]:
            raise ValueError(f"past_key_values: layer {layer_idx} gives K {tuple(key_states.shape[1::2])} and V "
                             f"{tuple(value_states.shape[1::2])} (heads, head_dim); this PagedCache holds "
                             f"({kv.num_kv_heads}, {kv.head_dim}) and ({kv.num_kv_heads}, {kv.head_dim_v})")
        if layer_idx == 0:
            self._begin_step(key_states, value_states, q_len)
        key_cache, value_cache = kv.key_cache(layer_idx), kv.value_cache(layer_idx)
        key_scales, value_scales = kv.key_scales(layer_idx), kv.value_scales(layer_idx)  # None unless int8
        writers = self._writers
        k = key_states if writers is None else key_states.index_select(0, writers)
        v = value_states if writers is None else value_states.index_select(0, writers)
        kvh, hd = k.shape[1], k.shape[3]
        write_kv(key_cache, value_cache, k.transpose(1, 2).reshape(-1, kvh, hd),
                 v.transpose(1, 2).reshape(-1, kvh, head_dim_v), self._slots, self.plan, key_scales=key_scales,
                 value_scales=value_scales)
        layer = self.layers[layer_idx]
        start = layer.visible_start(self.lengths[layer_idx])
        self.lengths[layer_idx] += q_len
        layer.is_initialized = True
        length = self.lengths[layer_idx]
        first = start // kv.block_size  # a windowed layer gathers only the blocks it shows
        tables, skip = self._tables[:, first:], start - first * kv.block_size
        keys = gather_blocks(key_cache, tables, length - first * kv.block_size, key_scales,
                             key_states.dtype)[:, skip:].transpose(1, 2)
        values = gather_blocks(value_cache, tables, length - first * kv.block_size, value_scales,
                               value_states.dtype)[:, skip:].transpose(1, 2)
        return keys, values

    def _reshape_storage(self, kv_heads: int, head_dim: int, head_dim_v: int) -> KVCache:
        """Before anything is stored, the cache's own storage re-shaped to the K/V the model gives (a config whose
        head counts do not say, e.g. multi-query attention, one rank's heads of a sharded model, or MLA's compressed
        latent and rotary key, which transformers caches in place of K and V), as many blocks."""
        old = self.kv_cache
        self.kv_cache = KVCache(old.num_layers, kv_heads, head_dim, layers=list(old.rows),
                                block_size=old.block_size, num_blocks=old.num_blocks, device=old.device,
                                kv_cache_dtype=old.kv_cache_dtype,
                                dtype=old.dtype if old.kv_cache_dtype == "auto" else torch.float32,
                                head_dim_v=head_dim_v)
        old.release()
        return self.kv_cache

    def _begin_step(self, key_states: torch.Tensor, value_states: torch.Tensor, q_len: int) -> None:
        batch = key_states.shape[0]
        if not self.rows:
            self.rows = [BlockTable(self.pool) for _ in range(batch)]
            leaders = self._identical_row_leaders(key_states, value_states) if self.share_identical_rows else None
        else:
            leaders = None
            if len(self.rows) != batch:
                raise ValueError(f"PagedCache holds {len(self.rows)} rows but the step has {batch}")
        writers = list(range(batch)) if leaders is None else sorted(set(leaders))
        slots: list[int] = []
        for row in writers:
            row_slots = self.rows[row].append_slots(q_len)
            while row_slots is None and self.growable:
                more = max(self.pool.num_blocks, self.rows[row].blocks_needed(q_len))
                self.pool.grow(more)
                self.kv_cache.grow(more)
                row_slots = self.rows[row].append_slots(q_len)
            if row_slots is None:
                raise MemoryError(
                    f"PagedCache: the block pool ({self.pool.num_blocks} blocks of {self.pool.block_size}) is too "
                    "small for this generation; give PagedCache more num_blocks or memory_bytes")
            slots.extend(row_slots)
        if leaders is not None:
            for row, leader in enumerate(leaders):
                if leader != row:
                    self.rows[row].free()
                    self.rows[row] = self.rows[leader].fork()
        self.kv_cache.copy_blocks(self.pool.take_copies(), self.plan)
        device = self.kv_cache.device
        self._writers = None if len(writers) == batch else torch.tensor(writers, device=device)
        self._slots = torch.tensor(slots, dtype=torch.long, device=device)
        self._refresh_tables()

    @staticmethod
    def _identical_row_leaders(key_states: torch.Tensor, value_states: torch.Tensor) -> list[int]:
        """For each row, the first row of its run of identical neighbours (generate's repeat_interleave)."""
        leaders = [0]
        for row in range(1, key_states.shape[0]):
            prev = leaders[-1]
            same = torch.equal(key_states[row], key_states[prev]) and torch.equal(value_states[row], value_states[prev])
            leaders.append(prev if same else row)
        return leaders

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: new row i continues old row ``beam_idx[i]``; block tables are forked, not copied."""
        old = self.rows
        self.rows = [old[i].fork() for i in beam_idx.tolist()]
        for row in old:
            row.free()
        self._refresh_tables()

    def batch_repeat_interleave(self, repeats: int) -> None:
        old = self.rows
        self.rows = [row.fork() for row in old for _ in range(repeats)]
        for row in old:
            row.free()
        self._refresh_tables()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def _refresh_tables(self) -> None:
        if self.rows and self.rows[0].blocks:
            width = max(len(r.blocks) for r in self.rows)
            null = self.kv_cache.null_block
            self._tables = torch.tensor([r.blocks + [null] * (width - len(r.blocks)) for r in self.rows],
                                        dtype=torch.long, device=self.kv_cache.device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Assisted decoding's rollback of rejected candidates: forget the last ``-tokens_to_remove`` positions
        (transformers' call; a positive value is the length to keep, as older versions pass it). The rows' block
        tables are truncated: blocks past the kept positions go back to the pool (a shared one loses a reference),
        and a windowed layer shows its window of what is kept."""
        length = self.get_seq_length()
        keep = length + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, length)
        if keep >= length:
            return
        if keep < 0:
            raise ValueError(f"tokens_to_remove: {tokens_to_remove} is more than the {length} positions cached")
        for row in self.rows:
            row.truncate(keep)
        self.lengths = [min(n, keep) for n in self.lengths]
        self._refresh_tables()

    # ---- lifetime ------------------------------------------------------------------------------
    @property
    def num_blocks_in_use(self) -> int:
        return len({b for row in self.rows for b in row.blocks})

    def free(self) -> None:
        """Return every block this cache holds to the pool."""
        for row in self.rows:
            row.free()
        self.rows = []
        self.lengths = [0] * len(self.lengths)
        for layer in self.layers:
            layer.is_initialized = False

    def reset(self) -> None:
        self.free()

    def __enter__(self) -> "PagedCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.free()
