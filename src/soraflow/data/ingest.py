"""Ingest one shard: fetch every source video into raw_dir, probe it, reject what is unusable.

A file appears in raw_dir only once it is complete (downloaded to `<name>.part`, then
renamed), so a finished file is never fetched again and an interrupted download resumes
with an HTTP Range request where the server allows it. One bad video becomes a row in the
rejects table; the rest of the shard carries on.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import requests
import urllib3

from soraflow.data import table
from soraflow.data.manifest import is_remote, resolve_url
from soraflow.data.probe import ProbeError, probe
from soraflow.core.progress import progress

DEFAULT_MAX_SIDE = 4096  # larger frames are almost always broken metadata or unusable for training
DEFAULT_BACKOFF_S = 1.0
# pages, not files: their video is fetched with yt-dlp (the optional `video-sites` extra)
DEFAULT_VIDEO_SITES = ("youtube.com", "youtu.be", "vimeo.com", "dailymotion.com", "bilibili.com", "tiktok.com")
CHUNK_BYTES = 1 << 20
EXTENSION_PATTERN = re.compile(r"^\.[A-Za-z0-9]{1,5}$")


class FetchError(Exception):
    """The video could not be fetched; not worth retrying."""


class TransientFetchError(FetchError):
    """A failure another attempt may not hit (timeout, 5xx, dropped connection)."""


class UnusableVideo(Exception):
    """The file decodes but is not a video we can train on."""


def raw_name(video_id: str, url: str) -> str:
    """`{id}{ext}` with the URL's extension, `.bin` when it has none (ffmpeg sniffs the content)."""
    suffix = Path(urlsplit(url).path if "://" in url else url).suffix.lower()
    return video_id + (suffix if EXTENSION_PATTERN.match(suffix) else ".bin")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_local(source: Path, dest: Path, max_bytes: int) -> None:
    if not source.is_file():
        raise FetchError(f"source file not found: {source}")
    if source.stat().st_size > max_bytes:
        raise FetchError(f"{source} is {source.stat().st_size} bytes, more than max_bytes {max_bytes}")
    tmp = dest.with_name(dest.name + ".part")
    shutil.copyfile(source, tmp)
    tmp.replace(dest)


def _resume_offset(response: requests.Response, offset: int) -> int:
    """Where the body starts in the file: `offset` for a matching 206, else 0 (start over)."""
    if offset and response.status_code == 206:
        match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            return offset
    return 0


def _download_once(url: str, part: Path, timeout_s: float, max_bytes: int) -> None:
    """One attempt: (re)start or resume `part`; returns once it holds the whole body."""
    offset = part.stat().st_size if part.exists() else 0
    # byte offsets only mean something in the undecoded body
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
            status = response.status_code
            if status == 416:  # our partial file does not fit the server's any more
                part.unlink()
                raise TransientFetchError(f"HTTP 416 resuming at byte {offset}; starting over")
            if status == 429 or status >= 500:
                raise TransientFetchError(f"HTTP {status} {response.reason}")
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
            with open(part, "ab" if start else "wb") as handle:
                for chunk in response.raw.stream(CHUNK_BYTES, decode_content=False):
                    handle.write(chunk)
                    received += len(chunk)
                    if received > max_bytes:
                        raise FetchError(f"more than max_bytes {max_bytes} bytes")
    except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError) as error:
        raise TransientFetchError(f"{type(error).__name__}: {error}") from None
    if expected is not None and received < expected:
        raise TransientFetchError(f"truncated body: got {received} of {expected} bytes")


def _download(url: str, dest: Path, params: dict) -> None:
    """Download with retries and exponential backoff, resuming the partial file between attempts."""
    part = dest.with_name(dest.name + ".part")
    attempts = int(params["retries"]) + 1
    backoff_s = float(params.get("backoff_s", DEFAULT_BACKOFF_S))
    for attempt in range(attempts):
        try:
            _download_once(url, part, float(params["timeout_s"]), int(params["max_bytes"]))
            part.replace(dest)
            return
        except TransientFetchError as error:
            if attempt == attempts - 1:
                raise FetchError(f"download failed after {attempts} attempts: {error}") from None
            time.sleep(backoff_s * 2**attempt)
        except FetchError:
            part.unlink(missing_ok=True)
            raise


def is_video_site(url: str, params: dict) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    sites = params.get("video_sites", DEFAULT_VIDEO_SITES)
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


def fetch(url: str, dest: Path, params: dict, sha256: str | None = None) -> Path:
    """Put the video at `url` at `dest`, unless a complete copy with the right checksum is there."""
    if dest.exists() and (not sha256 or sha256_of(dest) == sha256):
        return dest
    dest.unlink(missing_ok=True)
    if is_remote(url) and is_video_site(url, params):
        _download_video_site(url, dest, params)
    elif is_remote(url):
        _download(url, dest, params)
    else:
        try:
            source = Path(resolve_url(url))
        except ValueError as error:
            raise FetchError(str(error)) from None
        _copy_local(source, dest, int(params["max_bytes"]))
    if sha256:
        actual = sha256_of(dest)
        if actual != sha256:
            dest.unlink()
            raise FetchError(f"sha256 mismatch: manifest says {sha256}, file has {actual}")
    return dest


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


def ingest_shard(
    shard_table: str | Path, raw_dir: str | Path, out_table: str | Path, rejects_path: str | Path, params: dict
) -> None:
    """Fetch and probe every video of a shard; write the video table and the rejects table.

    params: timeout_s, retries, max_bytes; optional max_side (default 4096) and backoff_s.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    max_side = int(params.get("max_side", DEFAULT_MAX_SIDE))
    videos, rejects = [], []
    for record in progress(table.read(shard_table).to_dict("records"), desc="ingest"):
        dest = raw_dir / raw_name(record["id"], record["url"])
        sha256 = record.get("sha256")
        try:
            fetch(record["url"], dest, params, sha256 if isinstance(sha256, str) and sha256 else None)
            info = probe(dest)
            check_usable(info, max_side)
        except (FetchError, ProbeError, UnusableVideo) as error:
            rejects.append({"id": record["id"], "url": record["url"], "stage": "ingest", "reason": str(error)})
            continue
        duration_s = info["duration_s"] or info["num_frames"] / info["fps"]
        videos.append(
            {
                **record,
                "raw_path": str(dest),
                "path": str(dest),
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
        )
    table.write(pd.DataFrame(videos) if videos else table.empty(), out_table)
    table.write_rejects(rejects, rejects_path)
