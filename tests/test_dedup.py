"""Near-duplicate search and choice (soraflow.scoring.dedup) against brute force over all pairs."""

import itertools
import json

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from soraflow.cli import main
from soraflow.data import table
from soraflow.scoring.dedup import bands, dedup_corpus, near_duplicates, near_pairs, parse_phashes


def as_strings(hashes: np.ndarray) -> list[str]:
    return [" ".join(f"{int(h):016x}" for h in row) for row in hashes]


def brute_force_pairs(strings: list[str], max_total: int) -> list[tuple[int, int, int]]:
    """Every pair within max_total bits, from the hex strings with Python integers."""
    out = []
    for i, j in itertools.combinations(range(len(strings)), 2):
        total = sum((int(x, 16) ^ int(y, 16)).bit_count() for x, y in zip(strings[i].split(), strings[j].split()))
        if total <= max_total:
            out.append((i, j, total))
    return out


def corpus(seed: int, n: int, frames: int = 4) -> np.ndarray:
    """Random hashes, a third of them re-encodes of another (a few bits flipped per frame, some
    chained off a re-encode), and a few exact copies: pairs at every distance near the thresholds."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=(n, frames), dtype=np.uint64)
    for row in range(n // 3, 2 * n // 3):
        source = rng.integers(0, row)
        flips = rng.integers(0, 7, size=frames)
        hashes[row] = hashes[source]
        for frame, count in enumerate(flips):
            for bit in rng.choice(64, size=count, replace=False):
                hashes[row, frame] ^= np.uint64(1) << np.uint64(bit)
    hashes[-5:] = hashes[0]
    return hashes


@pytest.mark.parametrize("max_total", [0, 1, 5, 13, 16, 30, 256])
def test_near_pairs_are_exactly_the_pairs_brute_force_finds(max_total):
    hashes = corpus(seed=max_total, n=240)
    i, j, total = near_pairs(hashes, max_total)
    expected = brute_force_pairs(as_strings(hashes), max_total)
    assert list(zip(i.tolist(), j.tolist(), total.tolist())) == expected
    assert len(expected) > (0 if max_total == 0 else 5)  # the corpus has pairs to find


def test_candidates_verified_in_small_chunks_give_the_same_pairs(monkeypatch):
    import soraflow.scoring.dedup

    hashes = corpus(seed=7, n=240)
    expected = near_pairs(hashes, 30)
    monkeypatch.setattr(soraflow.scoring.dedup, "CANDIDATES_PER_CHUNK", 5)
    assert all(np.array_equal(x, y) for x, y in zip(near_pairs(hashes, 30), expected)) and len(expected[0]) > 5


def test_bands_are_disjoint_cover_every_bit_and_number_more_than_the_distance():
    for words, max_total in [(4, 0), (4, 16), (4, 48), (1, 12), (3, 100)]:
        edges = bands(words, max_total)
        assert len(edges) >= max_total + 1
        assert [lo for lo, _ in edges] == [0, *(hi for _, hi in edges[:-1])] and edges[-1][1] == 64 * words
        assert all(0 < hi - lo <= 64 for lo, hi in edges)


def clips(hashes: np.ndarray, durations, aes=None, ids=None) -> pd.DataFrame:
    ids = ids or [f"clip{k}" for k in range(len(hashes))]
    return pd.DataFrame({"id": ids, "phash": as_strings(hashes), "duration_s": durations,
                         "aes": aes if aes is not None else [None] * len(hashes)})  # fmt: skip


def flipped(row: np.ndarray, bits: range) -> np.ndarray:
    """The hashes with the same bits flipped in every frame."""
    mask = sum(1 << b for b in bits)
    return row ^ np.uint64(mask)


BASE = np.array([0x0123456789ABCDEF, 0xFEDCBA9876543210, 0x0F0F0F0F0F0F0F0F, 0x3333CCCC3333CCCC], dtype=np.uint64)


def test_a_chain_drops_the_middle_and_keeps_its_ends():
    # A ~ B (8 bits a frame), B ~ C (8 other bits), A and C 16 apart: over a threshold of 10
    a, b, c = BASE, flipped(BASE, range(8)), flipped(BASE, range(16))
    dropped = near_duplicates(clips(np.stack([a, b, c]), [3.0, 2.0, 1.0]), max_distance=10)
    assert dropped.to_dict("records") == [{"id": "clip1", "duplicate_of": "clip0", "distance": 8.0}]
    # C ranked first keeps C, drops B as its duplicate, and keeps A (no kept clip is like it)
    dropped = near_duplicates(clips(np.stack([a, b, c]), [1.0, 2.0, 3.0]), max_distance=10)
    assert dropped.to_dict("records") == [{"id": "clip1", "duplicate_of": "clip2", "distance": 8.0}]
    # B ranked first is like both: both go
    dropped = near_duplicates(clips(np.stack([a, b, c]), [1.0, 3.0, 2.0]), max_distance=10)
    assert dropped["id"].tolist() == ["clip0", "clip2"] and set(dropped["duplicate_of"]) == {"clip1"}


def test_the_longest_then_the_best_looking_then_the_first_id_stays():
    copies = np.stack([BASE, flipped(BASE, range(2)), flipped(BASE, range(1)), BASE])
    longest = near_duplicates(clips(copies, [2.0, 2.0, 5.0, 2.0], aes=[4.0, 6.0, 1.0, 5.0]), max_distance=4)
    assert set(longest["duplicate_of"]) == {"clip2"}
    best_looking = near_duplicates(clips(copies, [2.0] * 4, aes=[4.0, 6.0, None, 5.0]), max_distance=4)
    assert set(best_looking["duplicate_of"]) == {"clip1"} and "clip2" in set(best_looking["id"])  # unscored last
    first_id = near_duplicates(clips(copies, [2.0] * 4, ids=["d", "b", "c", "a"]), max_distance=4)
    assert set(first_id["duplicate_of"]) == {"a"}


def brute_force_choice(frame: pd.DataFrame, max_distance: float) -> dict[str, str]:
    """The rule as stated, over all pairs: best first, kept unless like a kept clip."""
    ranked = sorted(frame.itertuples(), key=lambda c: (-c.duration_s, -(c.aes if c.aes == c.aes else -np.inf), c.id))
    kept, dropped = [], {}
    for clip in ranked:
        like = [k for k in kept
                if np.mean([(int(x, 16) ^ int(y, 16)).bit_count() for x, y in zip(clip.phash.split(), k.phash.split())])
                <= max_distance]  # fmt: skip
        if like:
            dropped[clip.id] = like[0].id
        else:
            kept.append(clip)
    return dropped


@pytest.mark.parametrize("seed", [1, 2])
def test_the_choice_equals_brute_force_and_ignores_row_order(seed):
    rng = np.random.default_rng(seed)
    hashes = corpus(seed, n=150)
    frame = clips(hashes, rng.choice([1.0, 2.0, 3.0], size=len(hashes)).tolist(),
                  aes=[None if rng.random() < 0.2 else float(rng.integers(0, 4)) for _ in hashes])  # fmt: skip
    expected = brute_force_choice(frame, max_distance=3.5)
    dropped = near_duplicates(frame, max_distance=3.5)
    assert dict(zip(dropped["id"], dropped["duplicate_of"])) == expected and len(expected) > 10
    shuffled = near_duplicates(frame.sample(frac=1.0, random_state=seed), max_distance=3.5)
    assert dict(zip(shuffled["id"], shuffled["duplicate_of"])) == expected


def test_real_phashes_of_a_re_encoded_picture_are_near_and_of_another_picture_are_not():
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).resize((256, 256)) for _ in range(2)]

    def phash(images) -> str:
        return " ".join(str(imagehash.phash(image)) for image in images)

    original = [pictures[0], pictures[0].rotate(5)]
    softened = [image.resize((128, 128)).filter(ImageFilter.GaussianBlur(1)) for image in original]
    other = [pictures[1], pictures[1].rotate(5)]
    frame = pd.DataFrame({"id": ["original", "softened", "other", "unhashed"],
                          "phash": [phash(original), phash(softened), phash(other), None],
                          "duration_s": [2.0, 1.0, 1.0, 3.0], "aes": [None] * 4})  # fmt: skip
    dropped = near_duplicates(frame, max_distance=4)
    assert dropped[["id", "duplicate_of"]].to_dict("records") == [{"id": "softened", "duplicate_of": "original"}]


def test_phash_strings_of_different_lengths_are_an_error():
    with pytest.raises(ValueError, match="different numbers"):
        parse_phashes(["0123456789abcdef", "0123456789abcdef 0123456789abcdef"])


def test_dedup_corpus_writes_the_dropped_clips_of_every_shard_as_rejects(tmp_path):
    # shard 0 holds a clip and its re-encode, shard 1 another re-encode (longer) and another shot
    other = flipped(BASE, range(40))
    shards = [clips(np.stack([BASE, flipped(BASE, range(1))]), [2.0, 2.0], ids=["a0", "a1"]),
              clips(np.stack([flipped(BASE, range(2)), other]), [3.0, 2.0], ids=["b0", "b1"])]  # fmt: skip
    paths = []
    for k, shard in enumerate(shards):
        paths.append(tmp_path / f"scored_{k}.parquet")
        table.write(shard.assign(url=[f"{i}.mp4" for i in shard["id"]]), paths[-1])
    assert dedup_corpus(paths, tmp_path / "rejects.parquet", max_distance=4) == 2
    assert table.read(tmp_path / "rejects.parquet").to_dict("records") == [
        {"id": "a0", "url": "a0.mp4", "stage": "dedup", "reason": "near-duplicate of b0 (mean pHash distance 2 bits)"},
        {"id": "a1", "url": "a1.mp4", "stage": "dedup", "reason": "near-duplicate of b0 (mean pHash distance 1 bits)"},
    ]
    assert dedup_corpus(paths, tmp_path / "none.parquet", max_distance=None) == 0
    assert table.read(tmp_path / "none.parquet").empty
    with pytest.raises(ValueError, match="repeat"):
        dedup_corpus([paths[0], paths[0]], tmp_path / "twice.parquet", max_distance=4)


def test_the_tiny_run_searched_its_clips_and_a_loose_threshold_keeps_only_the_longest(finished_run, tmp_path):
    """The shared run's dedup step ran over its shards and dropped nothing (its clips are different
    shots); the same command over the run's scored tables at 64 bits (every clip alike) keeps one,
    and the export lists the dropped clips after the shards' rejects."""
    workdir, layout = finished_run.workdir, finished_run.layout
    assert table.read(workdir / layout.dedup_rejects()).empty
    scored = table.concat([workdir / path for path in layout.shard_files("scored")])
    assert scored["phash"].notna().all() and len(scored) > 3
    out = tmp_path / "rejects.parquet"
    shards = ["--shards-dir", str(workdir / layout.root / "shards"), "--num-shards", str(len(layout.shards))]
    main(["dedup", *shards, "--out", str(out), "--params", json.dumps({"max_distance": 64})])
    longest = scored.sort_values(["duration_s", "aes", "id"], ascending=[False, False, True])["id"].iat[0]
    dropped = table.read(out)
    assert sorted(dropped["id"]) == sorted(set(scored["id"]) - {longest})
    assert dropped["reason"].str.startswith(f"near-duplicate of {longest} ").all()

    main(["export", *shards, "--out", str(tmp_path / "clips.parquet"), "--opensora-v1.0-csv", str(tmp_path / "1.0.csv"),
          "--opensora-v1.1-csv", str(tmp_path / "1.1.csv"), "--rejects", str(tmp_path / "all.parquet"),
          "--dedup-rejects", str(out)])  # fmt: skip
    run_rejects = table.read(workdir / layout.exports()["rejects"])  # the run's: its dedup dropped none
    assert "broken" in set(run_rejects["id"]) and "dedup" not in set(run_rejects["stage"])
    exported = table.read(tmp_path / "all.parquet")
    assert exported.to_dict("records") == [*run_rejects.to_dict("records"), *dropped.to_dict("records")]
