"""Prefix caching (DESIGN.md "Beyond the paper"): every full KV block is named by a hash chained over
its parent's name and its own token ids, so a request whose tokens start like an earlier request's
finds that request's blocks, shares them by reference count and skips their prefill.

This module holds only the names: which block (device or host id, one id space) holds the K/V of which
full block of tokens. Whether a cached block is referenced or free, and the LRU order in which free
cached blocks are reused, is each tier's allocator's business (``block_manager``); moving cached
content between the tiers is ``tiers.BlockTiers``'.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

# The parent name of a sequence's first block.
ROOT_HASH = b""
HASH_BYTES = 16


def hash_block(parent_hash: bytes, token_bytes: bytes) -> bytes:
    """A full block's name: BLAKE2b (16 bytes) over its parent's name and its packed int32 token ids.

    Stable across processes and runs (unlike ``hash()`` of str/bytes), and fast: about a microsecond
    per block. Chaining makes the name depend on the whole prefix, not only on the block's own tokens."""
    return hashlib.blake2b(parent_hash + token_bytes, digest_size=HASH_BYTES).digest()


def extend_block_hashes(
    block_hashes: list[bytes], token_ids: array, num_blocks: int, block_size: int
) -> None:
    """Name the full blocks of ``token_ids`` until ``block_hashes`` holds ``num_blocks`` names.

    A request keeps its names for life: they depend only on its tokens, which never change."""
    parent = block_hashes[-1] if block_hashes else ROOT_HASH
    for index in range(len(block_hashes), num_blocks):
        parent = hash_block(parent, token_ids[index * block_size : (index + 1) * block_size].tobytes())
        block_hashes.append(parent)


def block_key(block_hashes: list[bytes], token_ids: array, index: int, block_size: int) -> bytes:
    """What block ``index`` was hashed from (its parent's name and its token ids): stored with each
    cached block, so that a hit is checked against the actual tokens, never trusted on the hash alone."""
    parent = block_hashes[index - 1] if index else ROOT_HASH
    return parent + token_ids[index * block_size : (index + 1) * block_size].tobytes()


@dataclass
class PrefixCacheStats:
    """Counters since start. Tokens, like vLLM's ``prefix_cache_queries``/``prefix_cache_hits``:
    ``num_query_tokens`` are the tokens of requests looked up on admission, ``num_*_hit_tokens`` those
    found cached, by the tier that held them."""

    num_query_tokens: int = 0
    num_device_hit_tokens: int = 0
    num_host_hit_tokens: int = 0
    num_demotions: int = 0  # evicted device blocks whose content moved to the host instead of being lost
    num_promotions: int = 0  # host hits copied to the device rather than streamed
    num_evictions: int = 0  # cached blocks forgotten: reused for other content, or above a shrunk lease


class PrefixCache:
    """``hash -> block id`` over the scheduler's whole block id space (``[0, D)`` device, ``[D, D + H)``
    host), and each cached block's key for checking a hit.

    A block is cached only once it is full and its K/V computed, and is never written while cached: a
    request appends into its own blocks, past every block it shares. At most one block holds a name:
    a second block computed with the same content (two requests prefilling the same prompt at once)
    stays private to its request and is recycled normally.
    """

    def __init__(self) -> None:
        self._block_ids: dict[bytes, int] = {}
        self._entries: dict[int, tuple[bytes, bytes]] = {}  # block id -> (name, key)
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._block_ids)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._entries

    def lookup(self, block_hash: bytes, key: bytes) -> int | None:
        """The block cached under ``block_hash`` if it was computed from exactly ``key``, else None."""
        block_id = self._block_ids.get(block_hash)
        if block_id is None or self._entries[block_id][1] != key:
            return None
        return block_id

    def insert(self, block_id: int, block_hash: bytes, key: bytes) -> bool:
        """Name ``block_id``; False (nothing changed) when another block already holds the name."""
        if block_hash in self._block_ids:
            return False
        if block_id in self._entries:
            raise ValueError(f"block {block_id} is cached already.")
        self._block_ids[block_hash] = block_id
        self._entries[block_id] = (block_hash, key)
        return True

    def remove(self, block_id: int) -> None:
        """Forget a block's content (it is about to be overwritten, or its memory goes away)."""
        block_hash, _ = self._entries.pop(block_id)
        del self._block_ids[block_hash]
        self.stats.num_evictions += 1

    def move(self, source_id: int, destination_id: int) -> None:
        """The content of ``source_id`` now lives in ``destination_id`` (a copy between tiers)."""
        entry = self._entries.pop(source_id)
        self._entries[destination_id] = entry
        self._block_ids[entry[0]] = destination_id
