"""Host-side step packing: requests' rows padded into the fixed-shape blocks a step runs.

Shapes are padded to power-of-two buckets (`bucket`), or the finer 1, 2, 3, 4, 6, 8, ... steps of
`fine_bucket`, so a long run compiles a bounded number of step variants.
"""

from typing import NamedTuple, Sequence

import numpy as np

from valora_jax.decoder import NULL_PAGE, Block


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def fine_bucket(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 times them) >= n:
    a third of the padding of `bucket` at worst, for twice the shapes."""
    n, power = max(n, 1), bucket(n)
    return 3 * power // 4 if 3 * power // 4 >= n else power


class RowSpec(NamedTuple):
    """One row of a step: `tokens` at positions start, start+1, ...; image_rows per token (None:
    all text); slot: adapter slot; pages: the sequence's KV pages in order; rope: M-RoPE
    positions [tokens, 3] (None: the model has none)."""

    tokens: Sequence[int]
    start: int
    image_rows: Sequence[int] | None
    slot: int
    pages: Sequence[int]
    rope: np.ndarray | None = None


def split_row(row: RowSpec, width: int) -> list[RowSpec]:
    """The row as consecutive rows of at most `width` tokens (same slot and pages): a block
    holds a long chunk in whole rows of its width instead of padding every row to the longest.
    A block's keys/values are all written before any of its rows attends, so each piece sees
    the ones before it."""
    return [row._replace(tokens=row.tokens[i: i + width], start=row.start + i,
                         image_rows=None if row.image_rows is None else row.image_rows[i: i + width],
                         rope=None if row.rope is None else row.rope[i: i + width])
            for i in range(0, len(row.tokens), width)]


def pack_block(rows: Sequence[RowSpec], min_tokens: int = 1, min_rows: int = 1, min_pages: int = 1,
               width: int | None = None) -> Block:
    """Pad rows into a Block of bucketed shape [bucket(rows, min_rows), bucket(longest row,
    min_tokens)], or of shape [max(rows, min_rows), width] given a `width` (rows of at most that
    many tokens, as split_row makes them); page tables padded with the null page to
    bucket(most pages, min_pages) columns; padding rows are all invalid; rope_positions [B, Q, 3]
    where the rows have M-RoPE positions (padding: 0). Larger minimums mean fewer distinct shapes
    to compile."""
    if width is not None and max(len(r.tokens) for r in rows) > width:
        raise ValueError(f"a row of {max(len(r.tokens) for r in rows)} tokens does not fit width {width}")
    b = max(len(rows), min_rows) if width is not None else bucket(len(rows), min_rows)
    q = width or bucket(max(len(r.tokens) for r in rows), min_tokens)
    columns = bucket(max(len(r.pages) for r in rows), min_pages)
    tokens, positions = np.zeros((b, q), np.int32), np.zeros((b, q), np.int32)
    image_rows, valid = np.full((b, q), -1, np.int32), np.zeros((b, q), bool)
    slot, page_table = np.full((b,), -1, np.int32), np.full((b, columns), NULL_PAGE, np.int32)
    rope = np.zeros((b, q, 3), np.int32) if rows[0].rope is not None else None
    for i, r in enumerate(rows):
        n = len(r.tokens)
        tokens[i, :n], positions[i, :n], valid[i, :n] = r.tokens, np.arange(r.start, r.start + n), True
        if r.image_rows is not None:
            image_rows[i, :n] = r.image_rows
        if rope is not None:
            rope[i, :n] = r.rope
        slot[i], page_table[i, : len(r.pages)] = r.slot, r.pages
    return Block(tokens, positions, valid, image_rows, slot, page_table, rope)
