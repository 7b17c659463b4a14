"""Kernel tile shapes: the frozen TileConfig (ATMM) and MergeTile (swift merge), the per-device
tuned table, and the run-time lookups.

The table (`configs/<device kind>.json`, written by `python -m pallas_kernels.tune`) maps shape
buckets to the fastest measured tile. Lookup is pure Python on static shapes (no device sync):

    bucket(T, D_in, D_out, R, n) = the table entry nearest in log2 space, tokens weighing most
    pick_tile(...)                = that entry's tile, or the kernels' heuristic tile when the table
                                    has no entry within one octave of T (or none for this device)
    pick_merge_tile(D_in, D_out, R) = the nearest merge entry's tile, or the kernels' default tile

A tile names its kernels (TileConfig.kernel, MergeTile.kernel: Pallas lowered through Triton, or
Mosaic GPU); the table's "kernel" says which a device runs by default, and a lookup sees only the
asked kernels' entries.
"""

import dataclasses
import functools
import json
import math
import pathlib

import jax

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"
KERNELS = ("triton", "mosaic")
_NUM_SMS = 132          # H100/H200; only the heuristic uses it
DECODE_TOKENS = 256     # up to this many tokens a call is decode-sized: one token per program can pay
_KEY_WEIGHTS = {"tokens": 4.0, "d_in": 1.0, "d_out": 1.0, "rank": 1.0, "adapters": 1.0}


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _require(tile, names: tuple, ok, what: str) -> None:
    """ValueError naming the first of the tile's fields `names` whose value fails `ok`."""
    for name in names:
        value = getattr(tile, name)
        if not ok(value):
            raise ValueError(f"{type(tile).__name__}.{name}={value} must be {what}")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Block shapes and launch parameters of the two ATMM kernels (shrink, expand)."""

    shrink_block_t: int = 32
    """Tokens per shrink program: a power of 2 >= 16 (tensor-core dots need M >= 16), or 1: one
    token per program in vector math (decode batches: a program per token keeps the GPU busy)."""
    block_k: int = 128
    """D_in columns per step of the shrink loop (power of 2, >= 16)."""
    split_k: int = 1
    """Shrink programs per token block, each summing a 1/split_k share of D_in (power of 2)."""
    shrink_warps: int = 4
    """Warps per shrink program."""
    shrink_stages: int = 3
    """Software-pipelining depth of the shrink loop."""
    expand_block_t: int = 32
    """Tokens per expand program (like shrink_block_t: a power of 2 >= 16, or 1)."""
    block_n: int = 128
    """D_out columns per expand program (power of 2, >= 16)."""
    expand_warps: int = 4
    """Warps per expand program."""
    expand_stages: int = 1
    """Pipelining depth of the expand kernel (it has no long loop)."""
    kernel: str = "triton"
    """Which kernels run the tile: "triton" (Pallas lowered through Triton, any CUDA GPU) or
    "mosaic" (Mosaic GPU: TMA and wgmma, Hopper; token blocks of 64, bfloat16 / float16; the
    stages fields are its pipeline depth, the warps fields unused)."""

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"TileConfig.kernel={self.kernel!r} must be one of {KERNELS}")
        if self.kernel == "mosaic" and (self.shrink_block_t, self.expand_block_t) != (64, 64):
            raise ValueError(f"a mosaic tile takes token blocks of 64 (one warpgroup's wgmma), got "
                             f"shrink_block_t={self.shrink_block_t}, expand_block_t={self.expand_block_t}")
        _require(self, ("block_k", "block_n"), lambda v: _is_pow2(v) and v >= 16, "a power of 2 >= 16")
        _require(self, ("shrink_block_t", "expand_block_t"), lambda v: v == 1 or (_is_pow2(v) and v >= 16),
                 "1 or a power of 2 >= 16")
        _require(self, ("split_k", "shrink_warps", "expand_warps"), _is_pow2, "a power of 2")
        _require(self, ("shrink_stages", "expand_stages"), lambda v: v >= 1, ">= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TileConfig":
        return cls(**d)


STATIC_TILE = TileConfig()
"""One mid-size tile for every shape, as static-tiling multi-LoRA kernels (Punica, S-LoRA) use:
the baseline adaptive tiling is measured against."""


@dataclasses.dataclass(frozen=True)
class MergeTile:
    """The swift-merge kernel's launch: one [block_m, block_n] tile of the weight per program."""

    block_m: int = 64
    """Weight rows (D_in) per program: a power of 2 >= 16 (the [BM, R] @ [R, BN] dot's M)."""
    block_n: int = 256
    """Weight columns (D_out) per program: a power of 2 >= 16."""
    warps: int = 8
    """Warps per program (power of 2)."""
    row_tiles: int = 1
    """[BM, BN] tiles per program, down the rows: the B tile is loaded once for all of them, and
    with stages > 1 the next tile's loads overlap the current one's dot and store."""
    stages: int = 1
    """Software-pipelining depth of the loop over row tiles."""
    kernel: str = "triton"
    """Which kernel runs the merge: "triton" or "mosaic" (Mosaic GPU, Hopper: block_m is raised to
    64, one warpgroup's wgmma; bfloat16 / float16; warps unused)."""

    def __post_init__(self):
        _require(self, ("block_m", "block_n"), lambda v: _is_pow2(v) and v >= 16, "a power of 2 >= 16")
        _require(self, ("warps",), _is_pow2, "a power of 2")
        _require(self, ("row_tiles", "stages"), lambda v: v >= 1, ">= 1")
        if self.kernel not in KERNELS:
            raise ValueError(f"MergeTile.kernel={self.kernel!r} must be one of {KERNELS}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MOSAIC_MERGE_TILE = MergeTile(block_m=64, block_n=256, row_tiles=8, stages=3, kernel="mosaic")
"""The Mosaic merge's tile where a device has no tuned one: [64, 256] tiles, 8 down the rows per
program (its B tile loaded once), the W and A tiles of 3 in flight."""


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def heuristic_tile(tokens: int, d_in: int, d_out: int, rank: int, adapters: int) -> TileConfig:
    """A tile from first principles, for shapes the table does not cover.

    Decode (T <= 256): one token per program (each reads its own adapter, from L2 when shared),
    D_in split until about two programs per SM, [BK, R] and [R, BN] adapter tiles of ~4K
    elements. Prefill: 32-token blocks (64 when R >= 64: fewer re-reads of the adapters), D_in
    split until the shrink launches about two programs per SM.
    """
    del d_out, adapters
    if tokens <= DECODE_TOKENS:
        width = max(32, min(256, _pow2_floor(4096 // rank)))
        split = max(1, min(_pow2_floor(max(1, 2 * _NUM_SMS // tokens)), _pow2_floor(max(1, d_in // width))))
        return TileConfig(shrink_block_t=1, block_k=width, split_k=split, expand_block_t=1, block_n=width)
    big = rank >= 64
    bt = 64 if big else 32
    blocks = -(-tokens // bt)
    split = max(1, min(_pow2_floor(max(1, 2 * _NUM_SMS // blocks)), _pow2_floor(max(1, d_in // 512))))
    return TileConfig(shrink_block_t=bt, block_k=128, split_k=split, expand_block_t=bt,
                      block_n=256 if big else 128, expand_warps=8 if big else 4)


def heuristic_mosaic_tile(tokens: int, d_in: int, rank: int) -> TileConfig:
    """A Mosaic GPU tile from first principles: 64-token blocks, D_in in 64-column steps split
    until the shrink launches about one program per SM (each split keeping >= 4 steps), a 3-deep
    TMA pipeline (2 at rank > 64, whose adapter tiles fill shared memory), 128-column outputs."""
    blocks = -(-tokens // 64)
    split = max(1, min(_pow2_floor(max(1, _NUM_SMS // blocks)), _pow2_floor(max(1, d_in // 256))))
    stages = 3 if rank <= 64 else 2
    return TileConfig(shrink_block_t=64, block_k=64, split_k=split, shrink_stages=stages, expand_block_t=64,
                      block_n=128, expand_stages=stages, kernel="mosaic")


def device_table_name(device_kind: str) -> str:
    """'NVIDIA H200' -> 'NVIDIA_H200' (the table's file stem)."""
    return "".join(c if c.isalnum() else "_" for c in device_kind)


@functools.lru_cache(maxsize=None)
def _table_file(device_kind: str) -> dict:
    path = CONFIG_DIR / f"{device_table_name(device_kind)}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def runs_mosaic(device=None) -> bool:
    """Whether a device (default: JAX's first) runs the Mosaic GPU kernels: a Hopper, compute capability 9.x."""
    device = device if device is not None else jax.devices()[0]
    return str(getattr(device, "compute_capability", "")).startswith("9.")


def _kernels(kernels: str | None, device_kind: str) -> str:
    """kernels, or the device's where None; ValueError unless one of KERNELS."""
    kernels = device_kernels(device_kind) if kernels is None else kernels
    if kernels not in KERNELS:
        raise ValueError(f"kernels {kernels!r} must be one of {KERNELS}")
    return kernels


def device_kernels(device_kind: str) -> str:
    """The kernels (ATMM and the swift merge) a device runs by default: its table's "kernel", one
    of KERNELS; "triton" for a device without a table or without that field."""
    return _table_file(device_kind).get("kernel", "triton")


def load_table(device_kind: str) -> tuple:
    """The tuned ATMM entries for a device kind: ((key dict, TileConfig), ...); () when none."""
    return tuple((e["key"], TileConfig.from_dict(e["tile"])) for e in _table_file(device_kind).get("entries", ()))


def load_merge_table(device_kind: str) -> tuple:
    """The tuned merge entries for a device kind: ((key dict, MergeTile), ...); () when none."""
    return tuple((e["key"], MergeTile(**e["tile"])) for e in _table_file(device_kind).get("merge", ()))


def _distance(key: dict, query: dict) -> float:
    return sum(w * abs(math.log2(max(1, key[k])) - math.log2(max(1, query[k])))
               for k, w in _KEY_WEIGHTS.items())


def pick_tile(tokens: int, d_in: int, d_out: int, rank: int, adapters: int,
              device_kind: str | None = None, kernels: str | None = None) -> TileConfig:
    """The tile for one ATMM call (pure Python on static shapes).

    tokens: T; d_in: D_in; d_out: total D_out of the weights sharing x; rank: padded rank R;
    adapters: an upper bound on the distinct adapters among the tokens (e.g. min(S, T));
    kernels: one of KERNELS, None = the device's (`device_kernels`). Only those kernels' entries
    of the table are looked at, then their heuristic.
    """
    query = {"tokens": tokens, "d_in": d_in, "d_out": d_out, "rank": rank, "adapters": adapters}
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    kernels = _kernels(kernels, kind)
    table = tuple(e for e in load_table(kind) if e[1].kernel == kernels)
    if table:
        key, tile = min(table, key=lambda e: _distance(e[0], query))
        per_token = tile.shrink_block_t == 1 or tile.expand_block_t == 1
        # a bucket within one octave of T, and one-token-per-program tiles only at decode sizes
        if abs(math.log2(max(1, key["tokens"])) - math.log2(max(1, tokens))) <= 1.0 and not (
                per_token and tokens > DECODE_TOKENS):
            return tile
    if kernels == "mosaic":
        return heuristic_mosaic_tile(tokens, d_in, rank)
    return heuristic_tile(tokens, d_in, d_out, rank, adapters)


def pick_merge_tile(d_in: int, d_out: int, rank: int, device_kind: str | None = None,
                    kernels: str | None = None) -> MergeTile:
    """The swift-merge tile for a [d_in, d_out] weight with pool rank `rank`: the kernels' tuned
    entry nearest in log2 space, or their default tile when the device has none (pure Python).
    kernels: one of KERNELS, None = the device's (`device_kernels`)."""
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    kernels = _kernels(kernels, kind)
    table = tuple(e for e in load_merge_table(kind) if e[1].kernel == kernels)
    if not table:
        return MOSAIC_MERGE_TILE if kernels == "mosaic" else MergeTile()
    query = {"d_in": d_in, "d_out": d_out, "rank": rank}
    return min(table, key=lambda e: sum(abs(math.log2(max(1, e[0][k])) - math.log2(max(1, v)))
                                        for k, v in query.items()))[1]
