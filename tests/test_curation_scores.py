"""Text area (OCR), perceptual hashes and caption-video match: real models on videos made here,
with expected values set by how the videos were made."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, encode_source, ffmpeg, section
from conftest_caption import tiny_models  # noqa: F401  (session fixture)
from PIL import Image, ImageDraw, ImageFont

from soraflow.data import table, video
from soraflow.scoring.filters import apply_filters, failed_filters
from soraflow.scoring.match import MatchScorer
from soraflow.scoring.phash import clip_phash, mean_distance
from soraflow.scoring.shard import match_shard, score_shard
from soraflow.scoring.text_area import _engine, frame_text_area, text_area
from soraflow.workflow import settings
from soraflow.workflow.settings import with_defaults

SIZE = (192, 128)  # width, height: OCR at the frame's own size
FONT_SIZE = 20
LINES = [((16, 20), "HELLO WORLD"), ((16, 84), "Subtitle 42")]


def gradient_frames(count: int) -> np.ndarray:
    """A smooth colour gradient drifting sideways: no text anywhere."""
    width, height = SIZE
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    frames = [np.concatenate([np.broadcast_to((x + k / 40) % 1 * 200, (height, width, 1)),
                              np.broadcast_to(y * 150 + 50, (height, width, 1)),
                              np.full((height, width, 1), 90.0)], axis=2) for k in range(count)]  # fmt: skip
    return np.stack(frames).astype(np.uint8)


def burn_in(frames: np.ndarray) -> tuple[np.ndarray, float]:
    """The frames with LINES written in white; and the area fraction of their text lines: each
    line's drawn width times the font's line height (ascent + descent), the box OCR reports."""
    font = ImageFont.load_default(size=FONT_SIZE)
    ascent, descent = font.getmetrics()
    out, area = [], 0.0
    for frame in frames:
        image = Image.fromarray(frame)
        draw = ImageDraw.Draw(image)
        for position, text in LINES:
            draw.text(position, text, fill=(255, 255, 255), font=font)
        out.append(np.asarray(image))
    for position, text in LINES:
        left, _, right, _ = ImageDraw.Draw(Image.new("RGB", SIZE)).textbbox(position, text, font=font)
        area += (right - left) * (ascent + descent)
    return np.stack(out), area / (SIZE[0] * SIZE[1])


@pytest.fixture(scope="module")
def text_videos(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("text_videos")
    plain = gradient_frames(12)
    texted, expected = burn_in(plain)
    paths = {"plain": folder / "plain.mp4", "text": folder / "text.mp4"}
    video.write_video(paths["plain"], torch.from_numpy(plain), 12)
    video.write_video(paths["text"], torch.from_numpy(texted), 12)
    return {"paths": paths, "expected": expected, "num_frames": 12}


def test_text_area_is_the_burned_in_text_and_zero_without_text(text_videos):
    paths, expected = text_videos["paths"], text_videos["expected"]
    assert 0.1 < expected < 0.3
    measured = text_area(paths["text"], text_videos["num_frames"], frames=2)
    # OCR's boxes fit the text lines to within their padding (0.7-1.35x over sizes and fonts)
    assert measured == pytest.approx(expected, rel=0.35)
    assert text_area(paths["plain"], text_videos["num_frames"], frames=2) == 0.0


def test_only_boxes_read_with_a_letter_or_digit_count_as_text():
    """The recogniser reads drawn signs confidently ("###" at ~0.98, as it read a bus-roof vent in
    the demo's footage as "■"); the text area is the line of letters and digits alone."""
    signs, letters = ((16, 20), "###"), ((16, 84), "Hi 42")
    font = ImageFont.load_default(size=FONT_SIZE)
    ascent, descent = font.getmetrics()
    image = Image.fromarray(gradient_frames(1)[0])
    draw = ImageDraw.Draw(image)
    for position, text in (signs, letters):
        draw.text(position, text, fill=(255, 255, 255), font=font)
    frame = np.asarray(image)
    readings = [reading for _box, reading, _score in _engine(0.5)(np.ascontiguousarray(frame[..., ::-1]))[0]]
    assert len(readings) == 2 and any(set(reading) == {"#"} for reading in readings)  # both lines are read
    left, _, right, _ = draw.textbbox(*letters, font=font)
    assert frame_text_area(frame) == pytest.approx((right - left) * (ascent + descent) / (SIZE[0] * SIZE[1]), rel=0.35)


def test_score_step_fills_text_area_and_phash_and_the_filter_drops_the_text_clip(text_videos, tmp_path):
    paths = text_videos["paths"]
    clips = pd.DataFrame({"id": ["plain", "text"], "url": ["u0", "u1"], "path": [str(paths["plain"]), str(paths["text"])],
                          "num_frames": [12, 12], "duration_s": [1.0, 1.0]})  # fmt: skip
    table.write(clips, tmp_path / "clips.parquet")
    score_shard(tmp_path / "clips.parquet", tmp_path / "scored.parquet",
                section("score", aesthetic_model=None, text_area={"frames": 2}, phash={"frames": 3}))  # fmt: skip
    scored = table.read(tmp_path / "scored.parquet")
    assert scored["text_area"].tolist()[0] == 0.0
    assert scored["text_area"].tolist()[1] == pytest.approx(text_videos["expected"], rel=0.35)
    for hashes in scored["phash"]:  # 3 hashes of 16 hex digits, single spaces
        assert re.fullmatch(r"[0-9a-f]{16}( [0-9a-f]{16}){2}", hashes), hashes
    kept, rejects = apply_filters(scored, {"max_text_area": 0.05})
    assert kept["id"].tolist() == ["plain"]
    assert [r["id"] for r in rejects] == ["text"] and failed_filters(rejects[0]["reason"]) == ["max_text_area"]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> dict:
    """A 2 s shot, the same shot re-encoded smaller at a much higher CRF, and a different shot."""
    folder = tmp_path_factory.mktemp("shots")
    shot = encode_source(folder / "shot.mp4", "testsrc2=size=256x256:rate=24", 48)
    reencoded = folder / "reencoded.mp4"
    ffmpeg("-i", str(shot), "-vf", "scale=160:160", "-c:v", "libx264", "-crf", "38", "-pix_fmt", "yuv420p", str(reencoded))
    other = encode_source(folder / "other.mp4", "mandelbrot=size=256x256:rate=24", 48)
    return {"shot": shot, "reencoded": reencoded, "other": other}


def test_phash_is_close_for_a_reencode_and_far_for_another_shot(shots):
    hashes = {name: clip_phash(path, 48, frames=4) for name, path in shots.items()}
    assert all(len(h.split(" ")) == 4 and all(len(part) == 16 for part in h.split(" ")) for h in hashes.values())
    assert mean_distance(hashes["shot"], hashes["shot"]) == 0.0
    assert mean_distance(hashes["shot"], hashes["reencoded"]) <= 12
    assert mean_distance(hashes["shot"], hashes["other"]) >= 26


def test_phash_frames_are_the_same_moments_whatever_the_frame_rate(shots, tmp_path):
    """Hashes are taken at the centres of equal parts of the clip: half the frame rate, same hashes."""
    halved = tmp_path / "halved.mp4"
    ffmpeg("-i", str(shots["shot"]), "-vf", "fps=12", "-c:v", "libx264", "-crf", "18", "-pix_fmt", "yuv420p", str(halved))
    assert video.count_frames(halved) == 24
    assert mean_distance(clip_phash(shots["shot"], 48), clip_phash(halved, 24)) <= 12


@pytest.fixture(scope="module")
def tiny_clip(tiny_models):
    return tiny_models["tiny-clip"]


def test_match_is_the_cosine_of_clips_own_image_and_text_features(tiny_clip, shots):
    """The scorer's mean over frames equals CLIPModel's get_image_features / get_text_features
    cosine, computed here through those other entry points."""
    from transformers import CLIPModel, CLIPProcessor

    scorer = MatchScorer.from_pretrained(str(tiny_clip), "cpu")
    caption = "a colour test pattern with a moving clock"
    frames = video.read_frames(shots["shot"], video.at_positions(48, video.spread_positions(3)))
    model, processor = CLIPModel.from_pretrained(str(tiny_clip)).eval(), CLIPProcessor.from_pretrained(str(tiny_clip))
    with torch.no_grad():
        image = model.get_image_features(**processor(images=[f.numpy() for f in frames], return_tensors="pt"))
        text = model.get_text_features(**processor(text=[caption], return_tensors="pt"))
    image, text = [getattr(x, "pooler_output", x) for x in (image, text)]
    expected = torch.nn.functional.cosine_similarity(image, text).mean()
    assert scorer.score_clip(shots["shot"], 48, caption, frames=3) == pytest.approx(float(expected), abs=1e-5)
    # a caption longer than the text model's 77 positions is cut, not an error
    assert -1 <= scorer.score_clip(shots["shot"], 48, "a very long caption " * 60) <= 1


def test_match_step_scores_every_captioned_clip_and_min_match_filters(tiny_clip, shots, tmp_path):
    captioned = pd.DataFrame({"id": ["shot", "other"], "url": ["u0", "u1"], "path": [str(shots["shot"]), str(shots["other"])],
                              "num_frames": [48, 48], "text": ["a test pattern", "a fractal zoom"]})  # fmt: skip
    table.write(captioned, tmp_path / "captioned.parquet")
    params = {"match": section("score", match={"model": str(tiny_clip), "frames": 2})["match"]}
    match_shard(tmp_path / "captioned.parquet", tmp_path / "matched.parquet", params)
    matched = table.read(tmp_path / "matched.parquet")
    assert matched["id"].tolist() == ["shot", "other"] and matched["match"].between(-1, 1).all()
    bar = float(matched["match"].max())
    kept, rejects = apply_filters(captioned.assign(match=matched["match"]), {"min_match": bar})
    assert kept["id"].tolist() == [matched.loc[matched["match"].idxmax(), "id"]] and len(rejects) == 1
    # the latent cache's jobs do not wait for captions: they are not given min_match, the stage index is
    config = with_defaults(yaml.safe_load((REPO / "workflow_config.yaml").read_text()))
    config["stages"]["stage3"]["filters"].update(min_match=bar, max_text_area=0.1)
    encode = settings.merged(settings.params(config, "encode_video", "stage3"), settings.operational(config, "encode_video", "stage3"))
    assert "min_match" not in encode["stage"]["filters"] and encode["stage"]["filters"]["max_text_area"] == 0.1
    assert settings.params(config, "dataset", "stage3")["stage"]["min_match"] == bar
    # without a model the column is empty, and min_match on it is an error naming the key
    match_shard(tmp_path / "captioned.parquet", tmp_path / "none.parquet", {"match": {"model": None, "frames": 2}})
    empty = captioned.assign(match=table.read(tmp_path / "none.parquet")["match"])
    with pytest.raises(ValueError, match="filter 'min_match' needs column 'match'"):
        apply_filters(empty, {"min_match": 0.1})


def test_report_counts_what_each_filter_removed_with_examples(shots, tmp_path):
    from soraflow.workflow.report import filters_html

    ids = ["a", "b", "c", "d"]
    clips = pd.DataFrame({"id": ids, "url": ids, "path": [str(shots["shot"])] * 4, "num_frames": [48] * 4,
                          "duration_s": [2.0, 0.3, 2.0, 0.2], "text_area": [0.0, 0.0, 0.4, 0.5]})  # fmt: skip
    table.write(clips, tmp_path / "clips.parquet")
    _, rejects = apply_filters(clips, {"min_seconds": 0.5, "max_text_area": 0.1})
    rejects.append({"id": "e", "url": "e", "stage": "encode_video", "reason": "7 frames, fewer than the 16 ..."})
    table.write_rejects(rejects, tmp_path / "rejects.parquet")
    filters_html(tmp_path / "clips.parquet", {"stage1": tmp_path / "rejects.parquet"}, tmp_path / "filters.html", examples=1)
    page = (tmp_path / "filters.html").read_text()
    rows = dict(re.findall(r"<tr><td><b>(\w+)</b></td><td>(\d+)</td>", page))
    assert rows == {"min_seconds": "2", "max_text_area": "2"}  # d fails both and counts for both
    assert "<b>b</b>" in page and "<b>c</b>" in page and page.count("<figure>") == 2  # one example each
    assert page.count('src="data:image/jpeg;base64,') == 2
    assert "<td>encode_video (not a filter)</td><td>1</td>" in page
