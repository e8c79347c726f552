"""The captioner: every frame reaches the model, bad captions are rejected, shards resume."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import section
from conftest_caption import make_clip_table, patterned_frames, tiny_models  # noqa: F401  (session fixture)

from soraflow.data import table
from soraflow.scoring.caption import (
    build_prompt,
    caption_shard,
    clean_caption,
    frame_indices,
    generate_captions,
    load_captioner,
    prepare_inputs,
)

PROMPT = "Describe the video."
FAST = {"max_new_tokens": 6, "batch_size": 4, "prompt": PROMPT}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from a second thread, and spinning threads on a busy
    2-core machine made these tests ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def captioner(tiny_models):
    return load_captioner(str(tiny_models["tiny-llava"]))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Six clips; clips 1 and 4 came with manifest captions."""
    folder = tmp_path_factory.mktemp("caption_clips")
    return make_clip_table(folder, 6, manifest_text={1: "A manifest caption.", 4: "Another one."})


@pytest.fixture(scope="module")
def always_eos_model(tiny_models, tmp_path_factory):
    """tiny-llava whose output head is zero: every logit ties, and greedy argmax picks the
    lowest id not suppressed, which is </s> (ids 0 and 1 are <unk> and <s>)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tmp_path_factory.mktemp("models") / "always-eos"
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["tiny-llava"])
    model.lm_head.weight.data.zero_()
    model.save_pretrained(path)
    AutoProcessor.from_pretrained(tiny_models["tiny-llava"]).save_pretrained(path)
    assert model.generation_config.eos_token_id == 2
    return str(path)


def run_shard(clips, folder, name: str, params: dict) -> dict:
    """caption_shard writing {name}.parquet and {name}_rejects.parquet under folder."""
    return caption_shard(clips, folder / f"{name}.parquet", folder / f"{name}_rejects.parquet", params)


def captions(path) -> dict[str, str]:
    out = table.read(path)
    return dict(zip(out["id"], out["text_generated"]))


def test_frame_indices():
    assert frame_indices(100, section("caption")["positions"]) == [20, 50, 80]
    assert frame_indices(10, [0.0, 1.0]) == [0, 9]
    assert frame_indices(1, [0.2, 0.5, 0.8]) == [0, 0, 0]  # a one-frame clip still gives every position a frame
    with pytest.raises(ValueError, match="positions"):
        frame_indices(10, [1.5])


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("The video shows a dog running on a beach.", "A dog running on a beach."),
        ("  The video depicts   a red car\n driving.  ", "A red car driving."),
        ("In the video, a man walks.", "A man walks."),
        ("this clip features two cats", "Two cats"),
        ("The frames show a sunset", "A sunset"),
        ("A bird flies. The video shows more.", "A bird flies. The video shows more."),
        ("The video shows", ""),
        ("\x11\x11\ufffd\x00", ""),
        ("a cat\u200b sits\x7f", "A cat sits"),
        ("   \n ", ""),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def image_token_runs(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Lengths of the runs of consecutive image tokens in one sequence."""
    runs, length = [], 0
    for token in input_ids.tolist() + [None]:
        if token == image_token_id:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


@pytest.mark.parametrize("num_frames", [1, 3, 5])
def test_every_frame_becomes_an_image_in_the_inputs(captioner, num_frames):
    model, processor = captioner
    assert build_prompt(processor, num_frames, PROMPT).count(processor.image_token) == num_frames
    inputs = prepare_inputs(processor, [patterned_frames(0, num_frames)], PROMPT)
    assert inputs["pixel_values"].shape[0] == num_frames
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert image_token_runs(inputs["input_ids"][0], processor.image_token_id) == [patches] * num_frames


def test_first_and_last_frames_both_reach_the_model(captioner):
    """Open-Sora #289: with one <image> token only the first frame was seen."""
    model, processor = captioner
    frames = patterned_frames(0, 3)
    first_changed, last_changed = frames.clone(), frames.clone()
    first_changed[0] = 255 - first_changed[0]
    last_changed[-1] = 255 - last_changed[-1]

    def next_token_logits(clip):
        inputs = prepare_inputs(processor, [clip], PROMPT)
        with torch.no_grad():
            return inputs["pixel_values"], model(**inputs).logits[0, -1]

    pixels, logits = next_token_logits(frames)
    pixels_last, logits_last = next_token_logits(last_changed)
    _, logits_first = next_token_logits(first_changed)
    assert torch.equal(pixels[:-1], pixels_last[:-1]) and not torch.equal(pixels[-1], pixels_last[-1])
    assert not torch.allclose(logits, logits_last)
    assert not torch.allclose(logits, logits_first)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_and_single_generation_agree(captioner, temperature):
    """Clips with different frame counts give prompts of different lengths: left padding. A
    sampled caption draws from its clip's own generator, so it too is the same in any batch."""
    model, processor = captioner
    batch = [patterned_frames(seed, num_frames) for seed, num_frames in [(0, 1), (1, 3), (2, 2)]]
    ids = ["clip0", "clip1", "clip2"]
    params = section("caption", max_new_tokens=8, prompt=PROMPT, temperature=temperature)
    batched = generate_captions(model, processor, batch, ids, params)
    single = [generate_captions(model, processor, [clip], [clip_id], params)[0] for clip, clip_id in zip(batch, ids)]
    assert batched == single
    assert all(text.strip() for text, _ in batched)
    assert load_captioner(model.name_or_path) is captioner  # loaded once per process


def test_sampling_follows_the_temperature_and_the_clip_seed(captioner):
    model, processor = captioner
    batch = [patterned_frames(seed, 3) for seed in range(3)]
    ids = ["clip0", "clip1", "clip2"]
    params = section("caption", max_new_tokens=8, prompt=PROMPT)
    greedy = generate_captions(model, processor, batch, ids, params)
    # near zero the tempered distribution is all on the greedy token
    assert generate_captions(model, processor, batch, ids, {**params, "temperature": 1e-4}) == greedy
    hot = {**params, "temperature": 1.0}
    sampled = generate_captions(model, processor, batch, ids, hot)
    assert sampled != greedy
    assert generate_captions(model, processor, batch, ids, {**hot, "seed": 1}) != sampled
    # a clip's draws come from its id: the same frames under another id sample another caption
    assert generate_captions(model, processor, batch[:1], ["other"], hot)[0] != sampled[0]


def test_existing_text_modes(clips, tiny_models, tmp_path):
    params = section("caption", **FAST, model=str(tiny_models["tiny-llava"]))
    out = {}
    for mode in ("keep", "replace", "both"):
        summary = run_shard(clips, tmp_path, mode, {**params, "existing_text": mode})
        assert summary["processed"] == (4 if mode == "keep" else 6)
        out[mode] = table.read(tmp_path / f"{mode}.parquet").set_index("id")
        assert len(out[mode]) == 6 and out[mode]["text"].notna().all()

    keep, replace, both = out["keep"], out["replace"], out["both"]
    assert keep.loc["clip1", "text"] == "A manifest caption." and pd.isna(keep.loc["clip1", "text_generated"])
    assert keep.loc["clip0", "text"] == keep.loc["clip0", "text_generated"]
    assert (replace["text"] == replace["text_generated"]).all() and replace["text_manifest"].isna().all()
    assert (both["text"] == both["text_generated"]).all()
    assert both.loc["clip4", "text_manifest"] == "Another one."
    assert both.loc["clip4", "text"] != "Another one."


def test_empty_and_truncated_captions_are_rejected(clips, tiny_models, always_eos_model, tmp_path):
    empty = run_shard(clips, tmp_path, "e", section("caption", **FAST, model=always_eos_model, min_new_tokens=0))
    rejects = table.read(tmp_path / "e_rejects.parquet")
    assert empty["rejected"] == 6 and len(table.read(tmp_path / "e.parquet")) == 0
    assert set(rejects["reason"]) == {"empty caption"} and set(rejects["stage"]) == {"caption"}
    assert rejects.set_index("id").loc["clip0", "url"].startswith("file://")

    # min_new_tokens (default 1) keeps the same model from stopping at once
    forced = run_shard(clips, tmp_path, "f", section("caption", **FAST, model=always_eos_model))
    assert forced["rejected"] == 0 and all(captions(tmp_path / "f.parquet").values())

    # the random tiny model never emits EOS: every caption is cut off at max_new_tokens
    params = section("caption", **FAST, model=str(tiny_models["tiny-llava"]))
    kept = run_shard(clips, tmp_path, "t", params)
    assert kept["rejected"] == 0
    cut = run_shard(clips, tmp_path, "t2", {**params, "reject_truncated": True})
    assert cut["rejected"] == 6
    assert all(r.startswith("truncated") for r in table.read(tmp_path / "t2_rejects.parquet")["reason"])


def test_undecodable_clip_is_a_reject_row(tiny_models, tmp_path):
    table_path = make_clip_table(tmp_path, 2)
    (tmp_path / "clip1.mp4").write_bytes(b"not a video")
    summary = run_shard(table_path, tmp_path, "out", section("caption", **FAST, model=str(tiny_models["tiny-llava"])))
    rejects = table.read(tmp_path / "out_rejects.parquet")
    assert summary["rejected"] == 1 and list(rejects["id"]) == ["clip1"]
    assert "clip1.mp4" in rejects["reason"][0]
    assert list(table.read(tmp_path / "out.parquet")["id"]) == ["clip0"]


def test_bad_params_name_the_key(clips, tiny_models, tmp_path):
    params = section("caption", **FAST, model=str(tiny_models["tiny-llava"]))
    with pytest.raises(ValueError, match="existing_text"):
        run_shard(clips, tmp_path, "o", {**params, "existing_text": "merge"})
    with pytest.raises(ValueError, match="positions"):
        run_shard(clips, tmp_path, "o", {**params, "num_frames": 2})
