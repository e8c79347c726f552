"""Near-duplicate clips across the whole corpus, from the clips' perceptual hashes.

A clip's `phash` holds K 64-bit pHashes of evenly spaced frames (soraflow.scoring.phash). Two
clips are near-duplicates when the mean Hamming distance over their K frame pairs is at most
`max_distance` bits, that is when the K*64-bit concatenations differ in at most
D = floor(K * max_distance) bits.

Finding the pairs (`near_pairs`) never compares all pairs. The concatenation is cut into D + 1
disjoint bands; two codes that differ in at most D bits agree exactly on at least one band
(pigeonhole), so only clips that share a band's value are candidates, and each candidate pair is
then verified on its full distance. The result is exactly the brute-force set of pairs. Clips with
identical hashes are collapsed first, so a pile of identical clips (black frames) costs one row.
The bands' width is about 64 / max_distance bits: the smaller the threshold, the rarer a chance
match and the faster the search (benchmarks/bench_dedup.py).

Which clip of a group stays (`keep_by_rank`): clips are ranked by duration (longest first), then
aesthetic score (highest first, a missing score last), then id; in that order each clip is kept
unless it is a near-duplicate of a clip already kept, and then it is dropped as a near-duplicate
of the best-ranked such clip. Chains are not merged: with A ~ B and B ~ C but not A ~ C, and A
ranked first, B is dropped (duplicate of A) and C is kept, since no kept clip is like it. So
every dropped clip names a kept clip within the threshold, and no two kept clips are within it.
The result depends on the clips, never on the order of the tables or shards they come in.

The workflow's dedup step (`dedup_corpus`) searches every shard's scored table at once and writes
the dropped clips as a rejects table, which every stage's index leaves out. Appending a shard
re-runs that search over the whole corpus (seconds: 13 CPU s for a million clips at 4 bits), never
another shard's jobs; the rank rule is global (a new clip may outrank a kept one anywhere), so the
choice itself cannot be made per shard.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from soraflow.data import table

HASH_BITS = 64
CANDIDATES_PER_CHUNK = 1 << 23  # candidate pairs verified at once (about 0.4 GB of temporaries)


def parse_phashes(strings) -> np.ndarray:
    """[N, K] uint64 from phash strings (K 16-hex-digit hashes joined by single spaces)."""
    strings = pd.Series(strings, dtype=object)
    lengths = set(strings.str.len())
    if len(lengths) > 1:
        counts = sorted({(length + 1) // 17 for length in lengths})
        raise ValueError(f"phash strings hold different numbers of hashes: {counts}")
    if strings.empty:
        return np.zeros((0, 1), dtype=np.uint64)
    words = (lengths.pop() + 1) // 17
    packed = bytes.fromhex("".join(strings).replace(" ", ""))  # the hex digits are big-endian
    return np.frombuffer(packed, dtype=">u8").astype(np.uint64).reshape(len(strings), words)


def total_distances(hashes: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Hamming distance between rows i and j of [N, K] hashes, summed over the K frames."""
    return np.bitwise_count(hashes[i] ^ hashes[j]).sum(axis=1, dtype=np.int64)


def bands(num_words: int, max_total: int) -> list[tuple[int, int]]:
    """At least max_total + 1 disjoint bit ranges [lo, hi) of num_words concatenated 64-bit
    words, as even as they can be and none wider than a word."""
    count = max(max_total + 1, num_words)
    edges = [round(num_words * HASH_BITS * b / count) for b in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def band_keys(hashes: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Bits [lo, hi) of every row's concatenated words, as one uint64."""
    word, shift = divmod(lo, HASH_BITS)
    keys = hashes[:, word] >> np.uint64(shift)
    if shift and hi > (word + 1) * HASH_BITS:  # the band runs into the next word
        keys = keys | (hashes[:, word + 1] << np.uint64(HASH_BITS - shift))
    width = hi - lo
    return keys if width == HASH_BITS else keys & np.uint64((1 << width) - 1)


def _ranges(sizes: np.ndarray) -> np.ndarray:
    """0..s-1 for each size s, concatenated."""
    ends = np.cumsum(sizes)
    return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - sizes, sizes)


def _band_pairs(hashes: np.ndarray, lo: int, hi: int, max_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) of rows that agree on bits [lo, hi) and differ in at most max_total bits."""
    keys = band_keys(hashes, lo, hi)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    starts, sizes = starts[sizes > 1], sizes[sizes > 1]
    if not len(starts):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    # in sorted order, position p of a run of size s pairs with the s - 1 - p positions after it
    position = _ranges(sizes)
    first = np.repeat(starts, sizes) + position
    partners = np.repeat(sizes, sizes) - 1 - position
    ordered = hashes[order]
    ends = np.cumsum(partners)
    found_a, found_b = [], []
    start = 0
    while start < len(first):  # a chunk of positions at a time: memory bounded by CANDIDATES_PER_CHUNK pairs
        stop = max(start + 1, int(np.searchsorted(ends, ends[start] - partners[start] + CANDIDATES_PER_CHUNK, side="right")))
        left = np.repeat(first[start:stop], partners[start:stop])
        right = left + _ranges(partners[start:stop]) + 1
        # verified a word at a time, dropping pairs as soon as they are too far apart (most pairs
        # are: a random word alone differs in 32 bits); neighbours in sorted order are close in memory
        total = np.zeros(len(left), dtype=np.int64)
        for word in range(hashes.shape[1]):
            total += np.bitwise_count(ordered[left, word] ^ ordered[right, word])
            near = total <= max_total
            left, right, total = left[near], right[near], total[near]
        found_a.append(order[left])
        found_b.append(order[right])
        start = stop
    a, b = np.concatenate(found_a), np.concatenate(found_b)
    return np.minimum(a, b), np.maximum(a, b)


def near_pairs(hashes: np.ndarray, max_total: int, workers: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance): every pair i < j of rows of [N, K] hashes whose total Hamming distance
    is at most max_total, each once, sorted by (i, j). Bands are searched `workers` at a time
    (numpy leaves the GIL for its array work)."""
    n, num_words = hashes.shape
    if n < 2 or max_total < 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    unique, inverse = np.unique(hashes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if max_total >= num_words * HASH_BITS:  # every pair is within it
        ui, uj = np.triu_indices(len(unique), k=1)
    else:
        with ThreadPoolExecutor(workers) as pool:
            found = list(pool.map(lambda band: _band_pairs(unique, *band, max_total), bands(num_words, max_total)))
        # a pair of distinct hashes is found once per band they share
        code = np.unique(np.concatenate([a for a, _ in found]) * len(unique) + np.concatenate([b for _, b in found]))
        ui, uj = code // len(unique), code % len(unique)
    rows_of = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(unique))
    first = np.r_[0, np.cumsum(counts)[:-1]]
    pairs_i, pairs_j = [], []
    # rows with the same hash: every pair among them (distance 0)
    for group in np.flatnonzero(counts > 1):
        rows = rows_of[first[group] : first[group] + counts[group]]
        a, b = np.triu_indices(len(rows), k=1)
        pairs_i.append(rows[a])
        pairs_j.append(rows[b])
    # rows of two near hashes: every row of one with every row of the other
    sizes = counts[ui] * counts[uj]
    pick = _ranges(sizes)
    each_i, each_j = np.repeat(ui, sizes), np.repeat(uj, sizes)
    pairs_i.append(rows_of[first[each_i] + pick // counts[each_j]])
    pairs_j.append(rows_of[first[each_j] + pick % counts[each_j]])
    i, j = np.concatenate(pairs_i).astype(np.int64), np.concatenate(pairs_j).astype(np.int64)
    i, j = np.minimum(i, j), np.maximum(i, j)
    order = np.lexsort((j, i))
    i, j = i[order], j[order]
    return i, j, total_distances(hashes, i, j)


def rank_order(clips: pd.DataFrame) -> np.ndarray:
    """Row positions best first: longest, then highest aesthetic score (missing last), then id."""
    aes = clips["aes"].astype(float).fillna(-np.inf) if "aes" in clips else pd.Series(0.0, index=clips.index)
    return np.lexsort((clips["id"].to_numpy(), -aes.to_numpy(), -clips["duration_s"].astype(float).to_numpy()))


def keep_by_rank(order: np.ndarray, i: np.ndarray, j: np.ndarray) -> dict[int, int]:
    """{dropped row: the kept row it duplicates}: in `order` (row positions, best first) each row
    is kept unless it is a near-duplicate (an (i, j) pair) of a row already kept; then it names
    the best-ranked such row."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    # each pair as (better, worse), grouped by the worse row, better rows best first
    better = np.where(rank[i] < rank[j], i, j)
    worse = np.where(rank[i] < rank[j], j, i)
    by = np.lexsort((rank[better], rank[worse]))
    better, worse = better[by], worse[by]
    dropped: dict[int, int] = {}
    starts = np.flatnonzero(np.r_[True, worse[1:] != worse[:-1]]) if len(worse) else []
    ends = [*starts[1:], len(worse)] if len(worse) else []
    for start, end in zip(starts, ends):  # worse rows in rank order, so their betters are settled
        for candidate in better[start:end]:
            if candidate not in dropped:
                dropped[int(worse[start])] = int(candidate)
                break
    return dropped


def near_duplicates(clips: pd.DataFrame, max_distance: float, workers: int = 1) -> pd.DataFrame:
    """The clips to drop: id, duplicate_of (the kept clip's id) and distance (mean bits over the
    frame pairs), in `clips` order. `clips` has id, phash, duration_s and aes; a clip without a
    phash is never a near-duplicate. `workers` threads search the bands."""
    hashed = clips[clips["phash"].notna()].reset_index(drop=True)
    hashes = parse_phashes(hashed["phash"])
    max_total = int(np.floor(hashes.shape[1] * max_distance + 1e-9))
    i, j, _ = near_pairs(hashes, max_total, workers)
    dropped = keep_by_rank(rank_order(hashed), i, j)
    rows = np.array(sorted(dropped), dtype=np.int64)
    kept = np.array([dropped[row] for row in rows], dtype=np.int64)
    return pd.DataFrame(
        {
            "id": hashed["id"].to_numpy()[rows],
            "duplicate_of": hashed["id"].to_numpy()[kept],
            "distance": total_distances(hashes, rows, kept) / hashes.shape[1],
        },
        columns=["id", "duplicate_of", "distance"],
    )


def dedup_corpus(scored_tables, out_rejects, max_distance: float | None, workers: int = 1) -> int:
    """Near-duplicates over every shard's scored table, written as a rejects table (stage dedup,
    reason "near-duplicate of <kept id>"): the clips every stage leaves out. None: no search,
    nothing dropped. Returns how many clips were dropped."""
    if max_distance is None:
        table.write_rejects([], out_rejects)
        return 0
    columns = ["id", "url", "phash", "duration_s", "aes"]
    clips = pd.concat([pq.read_table(path, columns=columns).to_pandas() for path in scored_tables], ignore_index=True)
    repeated = clips["id"][clips["id"].duplicated()]
    if len(repeated):
        raise ValueError(f"clip ids repeat across the scored tables: {repeated.head(3).tolist()}")
    dropped = near_duplicates(clips, max_distance, workers)
    url = dict(zip(clips["id"], clips["url"]))
    table.write_rejects(
        [{"id": row.id, "url": url[row.id], "stage": "dedup",
          "reason": f"near-duplicate of {row.duplicate_of} (mean pHash distance {row.distance:g} bits)"}
         for row in dropped.itertuples()],
        out_rejects,
    )  # fmt: skip
    return len(dropped)
