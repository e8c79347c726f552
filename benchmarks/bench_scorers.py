"""What each per-clip scorer of the score and match steps costs, at 256 and 512 px (issue 24).

    .venv/bin/python benchmarks/bench_scorers.py [--repeats 3] [--clips 4]

Clips: --clips synthetic 2 s, 24 fps H.264 clips per size (16:9, shorter side 256 or 512; ffmpeg's
test sources), half of them with two lines of white text burned in (OCR's recogniser then runs on
its boxes). Each scorer runs with the config's defaults, frames decoded from the file included:

- OCR text area: PP-OCRv4 (rapidocr-onnxruntime) on 3 frames at their own size, one ONNX thread;
- pHash: imagehash on 4 frames;
- CLIP match, tiny: the demo's random CLIP (64 px, ~0.3M parameters) on 3 frames and a caption;
- CLIP match, ViT-B/32 size: a random-weight CLIPModel of openai/clip-vit-base-patch32's shape
  (224 px, 151M parameters; no hub here, and the weights' values do not change the cost);
- motion (Farneback flow, the score step's existing scorer), for reference.

torch runs on one thread. Per clip: the median over clips and repeats of wall and CPU ms (the
process's CPU time); the machine is shared, so note the load average printed with the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from tables import print_table

from soraflow.data import video
from soraflow.demo.models import build_tiny_clip
from soraflow.scoring.match import MatchScorer
from soraflow.scoring.motion import motion_score
from soraflow.scoring.phash import clip_phash
from soraflow.scoring.text_area import text_area

SOURCES = ["testsrc2", "mandelbrot", "smptebars", "life", "rgbtestsrc", "cellauto"]
FRAMES = 48  # 2 s at 24 fps
CAPTION = "a colour test pattern with moving bars and a clock in the corner, the camera does not move"


def make_clip(out: Path, source: str, height: int, text: bool) -> Path:
    width = height * 16 // 9 // 2 * 2
    draw = (f",drawtext=text='SUBTITLE LINE {height}':fontcolor=white:fontsize={height // 12}:x=w/10:y=h*0.7,"
            f"drawtext=text='watermark.example':fontcolor=white:fontsize={height // 16}:x=w/2:y=h/12") if text else ""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", f"{source}=size={width}x{height}:rate=24",
                    "-frames:v", str(FRAMES), "-vf", f"null{draw}", "-c:v", "libx264", "-preset", "veryfast",
                    "-pix_fmt", "yuv420p", str(out)], check=True)  # fmt: skip
    return out


def vit_b32_clip(tiny: Path, out: Path) -> Path:
    """A random CLIPModel of ViT-B/32's shape, with the tiny model's tokenizer (ids fit its vocabulary)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    CLIPModel(CLIPConfig()).eval().save_pretrained(out)  # CLIPConfig's defaults are ViT-B/32's
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def timed(fn, clips, repeats: int) -> tuple[float, float]:
    fn(clips[0])  # warm: models loaded, ONNX sessions built
    walls, cpus = [], []
    for _ in range(repeats):
        for clip in clips:
            wall, cpu = time.perf_counter(), time.process_time()
            fn(clip)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return 1000 * statistics.median(walls), 1000 * statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clips", type=int, default=4, help="clips per size (half with burned-in text)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = build_tiny_clip(tmp / "tiny-clip")
        scorers = {"CLIP match (3 frames), tiny (the demo's)": MatchScorer.from_pretrained(str(tiny), "cpu"),
                   "CLIP match (3 frames), ViT-B/32 size": MatchScorer.from_pretrained(str(vit_b32_clip(tiny, tmp / "b32")), "cpu")}
        rows = []
        for height in (256, 512):
            clips = [make_clip(tmp / f"{height}_{k}.mp4", SOURCES[k % len(SOURCES)], height, text=k % 2 == 1)
                     for k in range(args.clips)]  # fmt: skip
            assert all(video.count_frames(c) == FRAMES for c in clips)
            texted, plain = clips[1::2], clips[0::2]
            runs = {
                "OCR text area (3 frames), clips with text": (lambda c: text_area(c, FRAMES), texted),
                "OCR text area (3 frames), clips without": (lambda c: text_area(c, FRAMES), plain),
                "pHash (4 frames)": (lambda c: clip_phash(c, FRAMES), clips),
                **{name: (lambda c, s=scorer: s.score_clip(c, FRAMES, CAPTION), clips) for name, scorer in scorers.items()},
                "motion (reference)": (motion_score, clips),
            }
            for name, (fn, subset) in runs.items():
                wall, cpu = timed(fn, subset, args.repeats)
                rows.append((name, f"{height * 16 // 9 // 2 * 2}x{height}", f"{wall:.1f}", f"{cpu:.1f}"))
        text_areas = {f"{c.name}": round(text_area(c, FRAMES), 3) for c in clips}
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; text area of the 512 px clips: {text_areas}")
    print_table(("scorer", "clip size", "ms per clip (wall)", "ms per clip (CPU)"), rows)


if __name__ == "__main__":
    main()
