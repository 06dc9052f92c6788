"""KVCache: the keys and values of past tokens, per layer, for incremental decoding.

Each layer's buffers are (batch, num_kv_heads, capacity, head_dim), allocated at that layer's first
update with the keys' dtype and device. With max_seqlen the capacity is allocated once (one
allocation for a whole generate()); without it the buffers grow by doubling. update() writes the
new tokens after the cached ones and returns views of everything cached so far, which the
attention reads in place (fusedattn takes any strides).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, max_seqlen: int | None = None):
        self.max_seqlen = max_seqlen
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def seqlen(self, layer_idx: int = 0) -> int:
        """Number of tokens cached in layer `layer_idx`."""
        return self.lengths[layer_idx]

    def update(self, layer_idx: int, k, v):
        """Appends k, v (batch, num_kv_heads, seqlen_new, head_dim) to layer `layer_idx`.

        Returns the layer's keys and values so far, (batch, num_kv_heads, seqlen, head_dim) views.
        """
        start = self.lengths[layer_idx]
        end = start + k.shape[2]
        if self.keys[layer_idx] is None or end > self.keys[layer_idx].shape[2]:
            self._grow(layer_idx, k, v, end)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        self.lengths[layer_idx] = end
        return keys[:, :, :end], values[:, :, :end]

    def _grow(self, layer_idx: int, k, v, needed: int):
        if self.max_seqlen is not None and needed > self.max_seqlen:
            raise ValueError(f"KVCache holds at most max_seqlen={self.max_seqlen} tokens; {needed} needed")
        old_keys, old_values = self.keys[layer_idx], self.values[layer_idx]
        old_capacity = 0 if old_keys is None else old_keys.shape[2]
        capacity = self.max_seqlen if self.max_seqlen is not None else max(needed, 2 * old_capacity)
        batch, num_kv_heads, _, head_dim = k.shape
        self.keys[layer_idx] = k.new_empty(batch, num_kv_heads, capacity, head_dim)
        self.values[layer_idx] = v.new_empty(batch, num_kv_heads, capacity, v.shape[3])
        length = self.lengths[layer_idx]
        if length:
            self.keys[layer_idx][:, :, :length] = old_keys[:, :, :length]
            self.values[layer_idx][:, :, :length] = old_values[:, :, :length]
