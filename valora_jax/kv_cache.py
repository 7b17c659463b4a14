"""Paged KV cache: device page arrays and the host-side page allocator.

Each layer has `k, v [H_kv, P, page_size, Dh]`; a sequence owns a list of pages, in order,
and its page table row maps position `pos` to `page_table[pos // page_size]`. Page 0
(`decoder.NULL_PAGE`) is reserved: unused table entries point there, and it is never written.
"""

import jax.numpy as jnp

from valora_jax.config import TextConfig
from valora_jax.decoder import NULL_PAGE


def init_pages(cfg: TextConfig, num_pages: int, page_size: int, dtype) -> list[tuple]:
    """Zeroed cache: one (k, v) pair of [H_kv, num_pages, page_size, Dh] per layer."""
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]


class OutOfPages(RuntimeError):
    """The cache has fewer free pages than asked for; nothing was allocated."""


class PageAllocator:
    """Free list over pages 1..num_pages-1 (page 0 is the null page)."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int]:
        """n pages, all or none (raises OutOfPages)."""
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} KV pages, {len(self._free)} free")
        taken, self._free = self._free[len(self._free) - n:], self._free[: len(self._free) - n]
        return taken[::-1]

    def free(self, pages: list[int]) -> None:
        bad = [p for p in pages if not NULL_PAGE < p < self.num_pages]
        if bad:
            raise ValueError(f"pages {bad} are not allocatable pages")
        self._free.extend(reversed(pages))
