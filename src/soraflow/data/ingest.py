"""Ingest one shard: fetch every source video, probe it, reject what is unusable.

Downloads run `concurrency` at a time (at most `per_host` per host); the tables keep the
shard's order whatever order they finish in. A downloaded file appears in raw_dir only once
it is complete (downloaded to `<name>.part`, then renamed), so a finished file is never
fetched again. Failed requests (connection errors, timeouts, 429 and 5xx) are retried by
urllib3's `Retry` on the requests session; a body cut mid-stream, which urllib3 does not
retry, is resumed with an HTTP Range request where the server allows it. Local sources are
hard-linked into raw_dir, read in place or copied (`local_sources`). One bad video becomes a
row in the rejects table; the rest of the shard carries on. Each finished video (its row or its
reject) is kept as a part beside the output table (core.resume), so a killed job's retry probes
only the videos it had not finished.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError, MaxRetryError, ProtocolError
from urllib3.util.retry import Retry

from soraflow.core.progress import ShardProgress
from soraflow.core.resume import JobProgress, file_digest, progress_folder
from soraflow.data import table
from soraflow.data.manifest import is_remote, resolve_url
from soraflow.data.probe import ProbeError, probe

LOCAL_SOURCES = ("link", "in_place", "copy")
RETRY_STATUSES = frozenset({429, *range(500, 600)})
CHUNK_BYTES = 1 << 20
EXTENSION_PATTERN = re.compile(r"^\.[A-Za-z0-9]{1,5}$")
# settings that never change the tables (schemas/affects.yaml), left out of the progress key
OPERATIONAL = ("timeout_s", "retries", "backoff_s", "concurrency", "per_host", "keep_raw")


class FetchError(Exception):
    """The video could not be fetched."""


class BodyCut(Exception):
    """The body stopped before its end (or a 416 voided our partial file): resume and try again."""


class UnusableVideo(Exception):
    """The file decodes but is not a video we can train on."""


def raw_name(video_id: str, url: str) -> str:
    """`{id}{ext}` with the URL's extension, `.bin` when it has none (ffmpeg sniffs the content)."""
    suffix = Path(urlsplit(url).path if "://" in url else url).suffix.lower()
    return video_id + (suffix if EXTENSION_PATTERN.match(suffix) else ".bin")


def http_retry(params: dict) -> Retry:
    """The retry policy of every request: `retries` more tries after a connection error, a
    timeout, a 429 or a 5xx, waiting urllib3's exponential backoff (the first retry at once,
    then backoff_s x 2, x 4, ...; a server's Retry-After is honoured)."""
    return Retry(
        total=int(params["retries"]),
        status_forcelist=RETRY_STATUSES,
        allowed_methods={"GET"},
        backoff_factor=float(params["backoff_s"]),
        raise_on_status=False,  # the last error response comes back, so the reject names its status
    )


def http_session(params: dict) -> requests.Session:
    """One session for all of a shard's download threads (urllib3's connection pools are
    thread-safe); each host's pool keeps a connection per worker for reuse."""
    session = requests.Session()
    adapter = HTTPAdapter(
        max_retries=http_retry(params), pool_maxsize=int(params["concurrency"])
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _failure(error: BaseException) -> str:
    """What went wrong, without requests' wrappers (urllib3's own error when its retries ran out)."""
    reason = error.args[0].reason if error.args and isinstance(error.args[0], MaxRetryError) else error
    return f"{type(reason).__name__}: {reason}"


def _resume_offset(response: requests.Response, offset: int) -> int:
    """Where the body starts in the file: `offset` for a matching 206, else 0 (start over)."""
    if offset and response.status_code == 206:
        match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            return offset
    return 0


def _download_once(session: requests.Session, url: str, part: Path, params: dict) -> None:
    """One request (urllib3 retries it as `http_retry` says): (re)start or resume `part`;
    returns once it holds the whole body, raises BodyCut when the body stops short."""
    max_bytes, retries = int(params["max_bytes"]), int(params["retries"])
    offset = part.stat().st_size if part.exists() else 0
    # byte offsets only mean something in the undecoded body
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        response = session.get(url, headers=headers, stream=True, timeout=float(params["timeout_s"]))
    except requests.RequestException as error:
        if error.args and isinstance(error.args[0], MaxRetryError):  # urllib3's retries ran out
            raise FetchError(f"download failed after {retries + 1} attempts: {_failure(error)}") from None
        raise FetchError(_failure(error)) from None
    with response:
        status = response.status_code
        if status == 416:  # our partial file does not fit the server's any more
            part.unlink()
            raise BodyCut(f"HTTP 416 resuming at byte {offset}; starting over")
        if status in RETRY_STATUSES:
            tries = len(response.raw.retries.history) + 1
            raise FetchError(f"download failed after {tries} attempts: HTTP {status} {response.reason}")
        if status not in (200, 206):
            raise FetchError(f"HTTP {status} {response.reason}")
        start = _resume_offset(response, offset)
        length = response.headers.get("Content-Length")
        expected = start + int(length) if length and length.isdigit() else None
        if expected is not None and expected > max_bytes:
            raise FetchError(f"{expected} bytes, more than max_bytes {max_bytes}")
        received = start
        # keep what arrived before a dropped connection (urllib3 would discard it), so the
        # next attempt can resume from there; the length check below catches the truncation
        response.raw.enforce_content_length = False
        try:
            with open(part, "ab" if start else "wb") as handle:
                for chunk in response.raw.stream(CHUNK_BYTES, decode_content=False):
                    handle.write(chunk)
                    received += len(chunk)
                    if received > max_bytes:
                        raise FetchError(f"more than max_bytes {max_bytes} bytes")
        except HTTPError as error:  # dropped or stalled mid-body
            raise BodyCut(_failure(error)) from None
    if expected is not None and received < expected:
        raise BodyCut(f"truncated body: got {received} of {expected} bytes")


def _download(session: requests.Session, url: str, dest: Path, params: dict) -> None:
    """Download to dest, resuming the partial file after a cut body, with the same retry
    budget and backoff as the requests' own retries."""
    part = dest.with_name(dest.name + ".part")
    resumes = http_retry(params)
    while True:
        try:
            _download_once(session, url, part, params)
            part.replace(dest)
            return
        except BodyCut as cut:
            try:
                # counted as urllib3 counts a broken connection: one more try, the next backoff
                resumes = resumes.increment(method="GET", url=url, error=ProtocolError(str(cut)))
            except MaxRetryError:
                raise FetchError(f"download failed after {len(resumes.history) + 1} attempts: {cut}") from None
            resumes.sleep()
        except FetchError:
            part.unlink(missing_ok=True)
            raise


def is_video_site(url: str, params: dict) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    sites = params["video_sites"]
    return any(host == site or host.endswith("." + site) for site in sites)


def _download_video_site(url: str, dest: Path, params: dict) -> None:
    """The page's video through yt-dlp, as one mp4 file, written under a temp name then renamed."""
    try:
        import yt_dlp
    except ImportError:
        raise FetchError("a video-site URL needs yt-dlp: pip install 'soraflow[video-sites]'") from None
    part = dest.with_name(dest.name + ".incomplete")  # yt-dlp treats a ".part" suffix as its own
    options = {
        "outtmpl": str(part),
        "format": "mp4/bestvideo[ext=mp4]/best",
        "retries": int(params["retries"]),
        "socket_timeout": float(params["timeout_s"]),
        "max_filesize": int(params["max_bytes"]),
        "noprogress": True,
        "quiet": True,
        "nopart": True,  # yt-dlp's own .part names would escape our temp name
        "overwrites": True,
    }
    try:
        with yt_dlp.YoutubeDL(options) as downloader:
            downloader.download([url])
    except yt_dlp.utils.DownloadError as error:
        part.unlink(missing_ok=True)
        raise FetchError(f"yt-dlp: {error}") from None
    if not part.exists():
        raise FetchError(f"yt-dlp wrote nothing (larger than max_bytes {params['max_bytes']}?)")
    part.replace(dest)


def _local_source(url: str, max_bytes: int) -> Path:
    try:
        source = Path(resolve_url(url))
    except ValueError as error:
        raise FetchError(str(error)) from None
    if not source.is_file():
        raise FetchError(f"source file not found: {source}")
    if source.stat().st_size > max_bytes:
        raise FetchError(f"{source} is {source.stat().st_size} bytes, more than max_bytes {max_bytes}")
    return source


def _place_local(source: Path, dest: Path, mode: str) -> Path:
    """Where the shard reads a local source: a hard link at dest (costs no space; the source
    on another filesystem or one without links is read in place), the source itself, or a copy."""
    if mode == "in_place":
        return source
    tmp = dest.with_name(dest.name + ".part")
    tmp.unlink(missing_ok=True)
    if mode == "link":
        try:
            os.link(source, tmp)
        except OSError:  # another device, no hard links there, or not allowed
            return source
    else:
        shutil.copyfile(source, tmp)
    tmp.replace(dest)
    return dest


class HostSlots:
    """At most `per_host` fetches in flight to any one host (politeness: a shard often lists
    thousands of URLs of one server). Local files take no slot."""

    def __init__(self, per_host: int):
        self.lock = threading.Lock()
        self.slots: dict[str, threading.Semaphore] = defaultdict(lambda: threading.Semaphore(per_host))

    def __call__(self, url: str):
        if not is_remote(url):
            return nullcontext()
        with self.lock:
            return self.slots[(urlsplit(url).hostname or "").lower()]


def local_sources_mode(params: dict) -> str:
    mode = params["local_sources"]
    if mode not in LOCAL_SOURCES:
        raise ValueError(f"ingest.local_sources must be one of {', '.join(LOCAL_SOURCES)}, got {mode!r}")
    return mode


def fetch(url: str, dest: Path, params: dict, session: requests.Session, sha256: str | None = None) -> Path:
    """Make the video at `url` readable at `dest` (or, for a local source read in place, at the
    source itself; the path is returned), unless a complete copy with the right checksum is there."""
    mode = local_sources_mode(params)
    remote = is_remote(url)
    if remote or mode != "in_place":
        if dest.exists() and (not sha256 or file_digest(dest) == sha256):
            return dest
        dest.unlink(missing_ok=True)
    if remote and is_video_site(url, params):
        path = dest
        _download_video_site(url, dest, params)
    elif remote:
        path = dest
        _download(session, url, dest, params)
    else:
        path = _place_local(_local_source(url, int(params["max_bytes"])), dest, mode)
    if sha256:
        actual = file_digest(path)
        if actual != sha256:
            if path == dest:  # never a source file
                dest.unlink()
            raise FetchError(f"sha256 mismatch: manifest says {sha256}, file has {actual}")
    return path


def check_usable(info: dict, max_side: int) -> None:
    if info["num_frames"] == 0:
        raise UnusableVideo("no decodable frames")
    if info["num_frames"] == 1:
        raise UnusableVideo("a single frame (a still image, not a video)")
    if info["fps"] <= 0:
        raise UnusableVideo("unknown frame rate")
    if min(info["width"], info["height"]) < 1:
        raise UnusableVideo(f"bad frame size {info['width']}x{info['height']}")
    if max(info["width"], info["height"]) > max_side:
        raise UnusableVideo(f"frame {info['width']}x{info['height']} is larger than max_side {max_side}")


def ingest_video(
    record: dict, raw_dir: Path, params: dict, session: requests.Session, slots: HostSlots
) -> tuple[dict | None, dict | None, int]:
    """(video row, None) or (None, reject row) for one manifest row, and the bytes of its file.
    Without keep_raw a reject's raw file goes at once: no split will ever read it."""
    url, sha256 = record["url"], record.get("sha256")
    dest = raw_dir / raw_name(record["id"], url)
    try:
        with slots(url):
            path = fetch(url, dest, params, session, sha256 if isinstance(sha256, str) else None)
        info = probe(path)
        check_usable(info, int(params["max_side"]))
    except (FetchError, ProbeError, UnusableVideo) as error:
        if not params["keep_raw"]:
            for leftover in (dest, dest.with_name(dest.name + ".part")):  # never a source: both lie in raw_dir
                leftover.unlink(missing_ok=True)
        return None, {"id": record["id"], "url": url, "stage": "ingest", "reason": str(error)}, 0
    duration_s = info["duration_s"] or info["num_frames"] / info["fps"]
    video = {
        **record,
        "raw_path": str(path),
        "path": str(path),
        "codec": info["codec"],
        "rotation": info["rotation"],
        "fps": info["fps"],
        "num_frames": info["num_frames"],
        "width": info["width"],
        "height": info["height"],
        "aspect_ratio": info["height"] / info["width"],
        "resolution": info["height"] * info["width"],
        "duration_s": duration_s,
        "start_frame": 0,
        "end_frame": info["num_frames"],
        "start_s": 0.0,
        "end_s": duration_s,
    }
    return video, None, path.stat().st_size


def ingest_shard(
    shard_table: str | Path, raw_dir: str | Path, out_table: str | Path, rejects_path: str | Path, params: dict
) -> None:
    """Fetch and probe every video of a shard; write the video table and the rejects table,
    both in the shard's order.

    params: timeout_s, retries, max_bytes; optional max_side (4096), backoff_s (1.0),
    video_sites, concurrency (16), per_host (8), local_sources (link | in_place | copy),
    keep_raw (true; false deletes the raw files of rejected videos, the split those of the rest).
    """
    local_sources_mode(params)  # a bad value is a config error, not a reject per local video
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    records = table.read(shard_table).to_dict("records")
    settings = {k: v for k, v in params.items() if k not in OPERATIONAL}
    progress = JobProgress(progress_folder(out_table), {"ingest": settings, "raw_dir": str(raw_dir),
                                                        "table": file_digest(shard_table)})
    # a finished video whose file has gone since (deleted by hand) is fetched again
    done = {item: part for item, part in progress.parts().items()
            if part["video"] is None or Path(part["video"]["raw_path"]).exists()}
    todo = [record for record in records if record["id"] not in done]
    slots = HostSlots(int(params["per_host"]))
    workers = max(1, min(int(params["concurrency"]), len(todo)))
    with (
        http_session(params) as session,
        ThreadPoolExecutor(workers, thread_name_prefix="ingest") as pool,
        ShardProgress(len(records), "ingest", done=len(records) - len(todo)) as bar,
    ):
        futures = {pool.submit(ingest_video, record, raw_dir, params, session, slots): record for record in todo}
        try:
            for future in as_completed(futures):
                video, reject, nbytes = future.result()
                progress.add(futures[future]["id"], {"video": video, "reject": reject})
                bar.advance(nbytes=nbytes)
        except BaseException:  # an unexpected error (disk full, ...) fails the job now, not after the shard
            for future in futures:
                future.cancel()
            raise
    finished = progress.parts()  # read back, as a retry reads them: the tables are the same either way
    parts = [finished[record["id"]] for record in records]
    videos = [part["video"] for part in parts if part["video"]]
    rejects = [part["reject"] for part in parts if part["reject"]]
    table.write(pd.DataFrame(videos) if videos else table.empty(), out_table)
    table.write_rejects(rejects, rejects_path)
    progress.remove()
