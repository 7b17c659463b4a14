"""Tile profiler: times candidate ATMM tiles per shape bucket on the GPU and writes the table.

    python -m pallas_kernels.tune [--tokens 1 16 ...] [--budget-s 600] [--out F] [--sweep-out F]
    python -m pallas_kernels.tune --merge          # the swift-merge tiles instead
    python -m pallas_kernels.tune --kernel mosaic [--merge]   # the Mosaic GPU kernels' tiles (a Hopper)

Per (T, R) it times the shrink kernel under every shrink candidate; then the expand kernel for
each D_out on the partial sums of the few fastest shrinks' split factors. The entry for bucket
(T, D_in, D_out, R, adapters) is the pair with the least total time. `--tokens` sweeps a subset
of the token buckets and keeps the table's other entries, so a sweep can be split over runs.
`--merge` times every MergeTile candidate on the LLaVA-1.5 weight shapes and keeps the fastest
per (D_in, D_out, R) in the table's "merge" section (the ATMM entries stay).
`--kernel mosaic` times the Mosaic GPU ATMM whole (plan, shrink, expand) per (T, R, D_out): its
shrink pipeline candidates at 128-column outputs, then the output widths under the fastest; its
entries join the Triton ones, and the table's "kernel" (the device's default) becomes the kernel
whose entries are faster in geometric mean over the buckets both hold.
"""

import argparse
import datetime
import functools
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import atmm, merge
from pallas_kernels.lora_reference import LoraWeight
from pallas_kernels.problems import Shape, make_inputs
from pallas_kernels.tiling import CONFIG_DIR, DECODE_TOKENS, MergeTile, TileConfig, device_table_name
from pallas_kernels.timing import BulkTimer, compile_all

TOKENS = (1, 16, 64, 256, 512, 1024, 4096)
RANKS = (16, 128)                 # pool R; R = 128 pools hold mixed ranks 16..128
D_IN = 4096
D_OUTS = (4096, 11008)
ADAPTERS = 64
L2_BYTES = 50 << 20
SPLITS_TRIED = 3         # shrink split factors whose partial sums the expand is timed on
EXPANDS_RETRIED = 4      # expand candidates re-timed on the other splits

# (block_t, block_k, split_k, warps) and (block_t, block_n, warps)
SHRINK = [(1, 128, s, 4) for s in (1, 2, 4, 8, 16, 32)] + [(1, 256, s, 4) for s in (2, 4, 8, 16)] + \
         [(1, 64, s, 2) for s in (4, 8, 16, 32)] + \
         [(16, 128, s, 4) for s in (4, 8, 16, 32)] + [(16, 256, s, 4) for s in (8, 16)] + \
         [(32, 128, s, 4) for s in (2, 4, 8)] + [(64, 128, s, 4) for s in (1, 2, 4)] + \
         [(32, 256, s, 4) for s in (1, 2, 4)] + [(64, 256, s, 8) for s in (1, 2)] + \
         [(64, 64, 1, 4), (64, 64, 2, 4), (128, 64, 1, 8), (128, 64, 2, 8), (128, 128, 1, 8)]
EXPAND = [(1, n, 4) for n in (32, 64, 128, 256, 512)] + [(1, 128, 2), (1, 256, 8)] + \
         [(16, n, 4) for n in (32, 64, 128, 256)] + [(32, n, 4) for n in (64, 128, 256)] + \
         [(64, 64, 4), (64, 128, 4), (64, 256, 8), (64, 512, 8), (128, 64, 4), (128, 128, 8), (128, 256, 8)]

# Mosaic GPU: (block_k, split_k, stages) at block_n 128, then the block_n under the fastest
MOSAIC_SHRINK = [(bk, split, stages) for bk in (64, 128) for split in (1, 2, 4, 8, 16) for stages in (2, 4)]
MOSAIC_BLOCK_N = (64, 256)

MERGE_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (5120, 5120), (5120, 13824), (13824, 5120))
MERGE_RANKS = (64,)       # the rank barely matters to a pass that streams W; lookups take the nearest
# (block_m, block_n, warps, row_tiles, stages): 2K-32K elements per tile, at most 128 float32
# accumulators per thread; one tile per program, or 4 down the rows with the loop pipelined
_MERGE_TILES = [(bm, bn, w) for bm in (16, 32, 64, 128) for bn in (64, 128, 256, 512, 1024) for w in (4, 8)
                if 2048 <= bm * bn <= 4096 * w]
MERGE = [(*t, 1, 1) for t in _MERGE_TILES] + [(*t, 4, 3) for t in _MERGE_TILES if t[0] <= 64]
# Mosaic GPU (warps unused): one warpgroup's [BM, BN] accumulator of at most 128 registers a thread,
# 1 to 8 row tiles down a column block, pipelines 2 or 3 deep
MOSAIC_MERGE = [(bm, bn, 4, rows, stages, "mosaic") for bm in (64, 128) for bn in (64, 128, 256) if bm * bn <= 16384
                for rows in (1, 4, 8) for stages in (2, 3)]


def _fits(block_t: int, tokens: int) -> bool:
    """Token blocks beyond max(32, T) only waste work (16 and 32 are timed on every bucket);
    one token per program only suits decode-sized batches."""
    if block_t == 1:
        return tokens <= DECODE_TOKENS
    return block_t <= max(32, 1 << max(0, (tokens - 1).bit_length()))


def _shape(tokens: int, rank: int, d_out: int) -> Shape:
    return Shape(tokens, D_IN, d_out, 16 if rank == 16 else "mixed", ADAPTERS, "uniform")


def _rotations(n_bytes: int) -> int:
    return int(min(4, max(1, math.ceil(3 * L2_BYTES / n_bytes))))


def _shrink_timer(cand, sets) -> BulkTimer:
    bt, bk, split, warps = cand
    tile = TileConfig(shrink_block_t=bt, block_k=bk, split_k=split, shrink_warps=warps)
    t_pad = -(-sets[0][0].shape[0] // 128) * 128
    merged = jnp.full((1,), -1, jnp.int32)
    return BulkTimer(lambda x, ws, slot: atmm._shrink(
        x, ws, slot, merged, tile=tile, t_pad=t_pad, mixture=False, interpret=False,
        poison=False), sets, unroll=4)


def _expand_timer(tokens: int, cand, sets) -> BulkTimer:
    bt, bn, warps = cand
    tile = TileConfig(expand_block_t=bt, block_n=bn, expand_warps=warps)
    merged = jnp.full((1,), -1, jnp.int32)
    return BulkTimer(lambda hs, ws, slot: atmm._expand(
        hs, ws, slot, merged, tokens, jnp.bfloat16, tile=tile, mixture=False,
        interpret=False, poison=False), sets, unroll=4)


def _shrink_sets(tokens: int, rank: int) -> list:
    shape = _shape(tokens, rank, D_OUTS[0])
    first = make_inputs(shape)
    k = _rotations(first[0].nbytes + first[1][0].a.nbytes)
    return [first] + [make_inputs(shape, seed=i) for i in range(1, k)]


def _expand_sets(tokens: int, rank: int, d_out: int, split: int) -> list:
    """(partial sums h [1, split, T_pad, RB], weights, slot) sets for the expand kernel."""
    shape = _shape(tokens, rank, d_out)
    rb = atmm._padded_rank(shape.max_rank)
    h = jnp.asarray(np.random.default_rng(0).standard_normal(
        (1, split, -(-tokens // 128) * 128, rb), np.float32))
    k = _rotations(ADAPTERS * rb * d_out * 2 + tokens * d_out * 2)
    return [((h,),) + make_inputs(shape, seed=i)[1:] for i in range(k)]


def _progress(total: int):
    try:
        from tqdm import tqdm
        return tqdm(total=total, file=sys.stdout, mininterval=5.0)
    except ImportError:
        class _Bar:
            n = 0

            def update(self, k=1):
                self.n += k
                print(f"\r{self.n}/{total}", end="", flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                print()
        return _Bar()


def _time_all(jobs, make_timer, bar) -> dict:
    """{job: seconds} for (key, cand) jobs: compiled in batches on threads, then timed one by one."""
    times = {}
    for job, timer in compile_all((job, functools.partial(make_timer, *job)) for job in jobs):
        if isinstance(timer, Exception):            # e.g. a tile needing more registers than exist
            print(f"\ncandidate {job} does not compile: {type(timer).__name__}: {str(timer)[:160]}")
        else:
            times[job] = timer.seconds(target_s=0.005)
        bar.update()
    return times


def _split_finalists(shrink_times: dict) -> list[int]:
    """The split factors of the SPLITS_TRIED fastest shrinks with distinct splits, fastest first."""
    fastest_first = sorted(shrink_times, key=shrink_times.get)
    return list(dict.fromkeys(cand[2] for cand in fastest_first))[:SPLITS_TRIED]


def sweep(budget_s: float, tokens_list=TOKENS, on_bucket=lambda out: None) -> dict:
    """{'shrink': {(T, R): {cand: s}}, 'expand': {(T, R, D_out, split): {cand: s}}} measured on the GPU.

    Per token bucket: every shrink candidate of both ranks (compiled concurrently); then every
    expand candidate on the partial sums of the fastest shrink's split, and the EXPANDS_RETRIED
    fastest of those on the splits of the next-fastest shrinks: the expand re-reads the partial
    sums once per split, so the fastest pair need not hold the fastest shrink. Buckets start
    while within budget_s; on_bucket(out) follows each one (to save what is measured so far).
    """
    start = time.perf_counter()
    per_bucket = len(RANKS) * (len(SHRINK) + len(D_OUTS) * (len(EXPAND) + (SPLITS_TRIED - 1) * EXPANDS_RETRIED))
    bar = _progress(len(tokens_list) * per_bucket)
    out = {"shrink": {}, "expand": {}}
    for tokens in tokens_list:
        if time.perf_counter() - start > budget_s:
            print(f"budget of {budget_s:.0f}s spent; buckets from T={tokens} on skipped")
            break
        done = bar.n
        sets = {rank: _shrink_sets(tokens, rank) for rank in RANKS}
        jobs = [(rank, cand) for rank in RANKS for cand in SHRINK
                if _fits(cand[0], tokens) and cand[2] * cand[1] <= D_IN]
        times = _time_all(jobs, lambda rank, cand: _shrink_timer(cand, sets[rank]), bar)
        del sets
        splits = {}
        for rank in RANKS:
            out["shrink"][(tokens, rank)] = {c: t for (r, c), t in times.items() if r == rank}
            splits[rank] = _split_finalists(out["shrink"][(tokens, rank)])
        first = {(rank, d_out, splits[rank][0]): list(EXPAND) for rank in RANKS for d_out in D_OUTS}
        _sweep_expand(tokens, first, out, bar)
        retry = {}
        for rank in RANKS:
            for d_out in D_OUTS:
                timed = out["expand"][(tokens, rank, d_out, splits[rank][0])]
                for split in splits[rank][1:]:
                    retry[(rank, d_out, split)] = sorted(timed, key=timed.get)[:EXPANDS_RETRIED]
        _sweep_expand(tokens, retry, out, bar)
        bar.update(max(0, done + per_bucket - bar.n))
        bar.set_postfix_str(f"T={tokens} splits {splits}")
        on_bucket(out)
    bar.close()
    return out


def _sweep_expand(tokens: int, candidates: dict, out: dict, bar) -> None:
    """Time {(R, D_out, split): [expand candidates]} into out['expand'][(T, R, D_out, split)]."""
    sets = {key: _expand_sets(tokens, *key) for key in candidates}
    jobs = [(key, cand) for key, cands in candidates.items() for cand in cands if _fits(cand[0], tokens)]
    times = _time_all(jobs, lambda key, cand: _expand_timer(tokens, cand, sets[key]), bar)
    for key in candidates:
        out["expand"][(tokens, *key)] = {c: t for (k, c), t in times.items() if k == key}


def mosaic_tile(block_k: int, split_k: int, stages: int, block_n: int = 128) -> TileConfig:
    return TileConfig(shrink_block_t=64, block_k=block_k, split_k=split_k, shrink_stages=stages, expand_block_t=64,
                      block_n=block_n, expand_stages=stages, kernel="mosaic")


def _mosaic_sets(tokens: int, rank: int, d_out: int) -> list:
    """(x, weights, slot) sets of one bucket, beyond L2 together."""
    shape = _shape(tokens, rank, d_out)
    first = make_inputs(shape)
    k = _rotations(first[0].nbytes + first[1][0].a.nbytes + first[1][0].b.nbytes)
    return [first] + [make_inputs(shape, seed=i) for i in range(1, k)]


def sweep_mosaic(budget_s: float, tokens_list=TOKENS, on_bucket=lambda out: None) -> dict:
    """{(T, R, D_out): {(block_k, split_k, stages, block_n): seconds}} of the whole Mosaic ATMM,
    measured on the GPU (buckets start while within budget_s; on_bucket(out) follows each)."""
    start, out = time.perf_counter(), {}
    bar = _progress(len(tokens_list) * len(RANKS) * len(D_OUTS) * (len(MOSAIC_SHRINK) + len(MOSAIC_BLOCK_N)))
    for tokens in tokens_list:
        if time.perf_counter() - start > budget_s:
            print(f"budget of {budget_s:.0f}s spent; buckets from T={tokens} on skipped")
            break
        for rank in RANKS:
            for d_out in D_OUTS:
                sets = _mosaic_sets(tokens, rank, d_out)

                def timer(_, cand):
                    tile = mosaic_tile(*cand)
                    return BulkTimer(lambda x, ws, slot: atmm.lora_delta(x, ws, slot, tile=tile), sets, unroll=4)

                shrinks = [(None, (*c, 128)) for c in MOSAIC_SHRINK if c[0] * c[1] * 2 <= D_IN]
                times = _time_all(shrinks, timer, bar)
                best = min(times, key=times.get)[1][:3] if times else (64, 1, 2)
                times |= _time_all([(None, (*best, n)) for n in MOSAIC_BLOCK_N], timer, bar)
                out[(tokens, rank, d_out)] = {cand: t for (_, cand), t in times.items()}
        on_bucket(out)
    bar.close()
    return out


def mosaic_entries(result: dict, command: str) -> list[dict]:
    """The fastest Mosaic tile per (T, R, D_out) bucket, with its time."""
    date, entries = datetime.date.today().isoformat(), []
    for (tokens, rank, d_out), times in sorted(result.items()):
        if times:
            best = min(times, key=times.get)
            key = {"tokens": tokens, "d_in": D_IN, "d_out": d_out, "rank": rank, "adapters": min(tokens, ADAPTERS)}
            entries.append({"key": key, "tile": mosaic_tile(*best).to_dict(), "us": round(times[best] * 1e6, 2),
                            "command": command, "date": date})
    return entries


def default_kernels(entries: list[dict]) -> str:
    """The kernel whose entries are faster in geometric mean over the buckets both kernels hold
    (an ATMM entry's time: its shrink + expand, or its whole "us"); "triton" without such buckets."""
    times = {}
    for e in entries:
        kernel = e["tile"].get("kernel", "triton")
        us = e.get("us", e.get("shrink_us", 0.0) + e.get("expand_us", 0.0))
        times.setdefault(tuple(e["key"].values()), {})[kernel] = us
    both = [t for t in times.values() if len(t) == 2 and min(t.values()) > 0]
    if not both:
        return "triton"
    log_ratio = sum(math.log(t["mosaic"] / t["triton"]) for t in both) / len(both)
    return "mosaic" if log_ratio < 0 else "triton"


def _merge_sets(d_in: int, d_out: int, rank: int) -> list:
    """(kernel [D_in, D_out], a 2-slot pool of rank `rank`, slot) sets, bfloat16, beyond L2 together."""
    def one(seed):
        rng = np.random.default_rng(seed)
        normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02, jnp.bfloat16)
        w = LoraWeight(normal(2, d_in, rank), normal(2, rank, d_out), jnp.ones((2,), jnp.float32),
                       jnp.full((2,), rank, jnp.int32))
        return normal(d_in, d_out), w, jnp.int32(seed % 2)
    return [one(i) for i in range(_rotations(2 * d_in * d_out))]


def sweep_merge(candidates=MERGE) -> dict:
    """{(D_in, D_out, R): {MergeTile fields: seconds}} for every candidate (MERGE or MOSAIC_MERGE)."""
    shapes = [(d_in, d_out, r) for d_in, d_out in MERGE_SHAPES for r in MERGE_RANKS]
    bar = _progress(len(shapes) * len(candidates))
    out = {}
    for shape in shapes:
        sets = _merge_sets(*shape)
        timer = lambda shape, cand: BulkTimer(functools.partial(merge._merge, tile=MergeTile(*cand), interpret=False),
                                              sets, unroll=4)
        out[shape] = {c: t for (_, c), t in _time_all([(shape, c) for c in candidates], timer, bar).items()}
        del sets
    bar.close()
    return out


def merge_entries(result: dict, command: str) -> list[dict]:
    """The fastest tile per merge shape, with its time and achieved bandwidth."""
    date, entries = datetime.date.today().isoformat(), []
    for (d_in, d_out, rank), times in sorted(result.items()):
        if not times:
            continue
        best = min(times, key=times.get)
        entries.append({"key": {"d_in": d_in, "d_out": d_out, "rank": rank}, "tile": MergeTile(*best).to_dict(),
                        "us": round(times[best] * 1e6, 2),
                        "tb_per_s": round(merge.merge_bytes(d_in, d_out, rank) / times[best] / 1e12, 3),
                        "command": command, "date": date})
    return entries


def best_pairs(result: dict) -> dict:
    """{(T, R, D_out): (shrink cand, shrink s, expand cand, expand s)}: per bucket, the pair with
    the least total time over the splits whose expand was timed."""
    best = {}
    for (tokens, rank, d_out, split), times in result["expand"].items():
        shrink = {c: t for c, t in result["shrink"][(tokens, rank)].items() if c[2] == split}
        if not times or not shrink:
            continue
        s, e = min(shrink, key=shrink.get), min(times, key=times.get)
        key = (tokens, rank, d_out)
        if key not in best or shrink[s] + times[e] < best[key][1] + best[key][3]:
            best[key] = (s, shrink[s], e, times[e])
    return best


def build_table(result: dict, command: str) -> dict:
    """The table of one sweep; each entry names the command and date that measured it."""
    entries, date = [], datetime.date.today().isoformat()
    for (tokens, rank, d_out), (s, s_time, e, e_time) in sorted(best_pairs(result).items()):
        tile = TileConfig(shrink_block_t=s[0], block_k=s[1], split_k=s[2], shrink_warps=s[3],
                          expand_block_t=e[0], block_n=e[1], expand_warps=e[2])
        key = {"tokens": tokens, "d_in": D_IN, "d_out": d_out, "rank": rank,
               "adapters": min(tokens, ADAPTERS)}
        entries.append({"key": key, "tile": tile.to_dict(),
                        "shrink_us": round(s_time * 1e6, 2), "expand_us": round(e_time * 1e6, 2),
                        "command": command, "date": date})
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "entries": entries}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="token buckets to sweep")
    p.add_argument("--budget-s", type=float, default=600.0, help="stop sweeping new buckets after this")
    p.add_argument("--out", help="table path (default: pallas_kernels/configs/<device>.json)")
    p.add_argument("--merge", action="store_true", help="sweep the swift-merge tiles (not ATMM's)")
    p.add_argument("--kernel", choices=("triton", "mosaic"), default="triton", help="whose tiles to sweep")
    p.add_argument("--sweep-out", help="also write every measured time here (JSON)")
    args = p.parse_args(argv)
    command = ("python -m pallas_kernels.tune " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    out = pathlib.Path(args.out or CONFIG_DIR / f"{device_table_name(jax.devices()[0].device_kind)}.json")
    old = json.loads(out.read_text()) if out.exists() else {}
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(table: dict) -> None:
        with open(out, "w") as f:
            json.dump(table, f, indent=1)
        print(f"wrote {len(table['entries'])} ATMM and {len(table['merge'])} merge entries to {out}", flush=True)

    def write_atmm(result: dict) -> None:
        new = mosaic_entries(result, command) if args.kernel == "mosaic" else build_table(result, command)["entries"]
        swept = {e["key"]["tokens"] for e in new}    # keep the buckets this run did not sweep, and the other kernel's
        kept = [e for e in old.get("entries", [])
                if e["key"]["tokens"] not in swept or e["tile"].get("kernel", "triton") != args.kernel]
        entries = sorted(kept + new, key=lambda e: (tuple(e["key"].values()), e["tile"].get("kernel", "triton")))
        write({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "kernel": default_kernels(entries),
               "entries": entries, "merge": old.get("merge", [])})

    if args.merge:
        result = {"merge": sweep_merge(MOSAIC_MERGE if args.kernel == "mosaic" else MERGE)}
        kept = [e for e in old.get("merge", []) if e["tile"].get("kernel", "triton") != args.kernel]
        write({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "kernel": default_kernels(old.get("entries", [])), "entries": old.get("entries", []),
               "merge": kept + merge_entries(result["merge"], command)})
    else:
        run = sweep_mosaic if args.kernel == "mosaic" else sweep
        result = run(args.budget_s, args.tokens, on_bucket=write_atmm)   # saved after every bucket
        result = {"mosaic": result} if args.kernel == "mosaic" else result
    if args.sweep_out:
        flat = {kind: [{"bucket": list(b), "cand": list(c), "us": round(t * 1e6, 2)}
                       for b, times in d.items() for c, t in times.items()]
                for kind, d in result.items()}
        with open(args.sweep_out, "w") as f:
            json.dump({"command": command, **flat}, f, indent=0)


if __name__ == "__main__":
    main()
