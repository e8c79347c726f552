"""Captioning clips with a LLaVA-family model, as Open-Sora 1.0 did with LLaVA-1.6-34B.

The model loads through transformers' AutoModelForImageTextToText + AutoProcessor, so
LLaVA-1.5, LLaVA-NeXT, NeXT-Video and OneVision ids (or local dirs) all work by config.
Open-Sora fed three frames (20/50/80% of the clip) but its prompt held one <image>
token, so only the first frame reached the model (issue #289); here the chat template
gets one image entry per frame. Captions that come out empty, or cut off at the token
limit, go to the rejects table with a reason instead of into training (issue #167).

The job uses every GPU it was given: one replica of the model per GPU, the shard's batches
shared between them, where the model and a batch's generation fit one GPU; the model's layers
spread over the GPUs (accelerate's balanced device_map) where they do not
(soraflow.scoring.captioner_memory decides, and `soraflow plan` says which and why). Captions
are the same either way: each clip's depends on its own frames and generator alone.

A shard is resumable: every batch's results are kept as a part beside the output table
(core.resume), and a retry captions only the clips missing there.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import pandas as pd
import pyarrow as pa
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from soraflow.core.devices import device_memory, job_devices, model_dtype, use_device
from soraflow.core.hub import resolve_model_ref
from soraflow.core.progress import progress
from soraflow.core.resume import JobProgress, file_digest, input_signature, progress_folder
from soraflow.data import table, video
from soraflow.scoring.captioner_memory import RESERVED, captioner_memory, placement

log = logging.getLogger(__name__)

EXISTING_TEXT_MODES = ("keep", "replace", "both")
OPERATIONAL = ("batch_size",)  # settings that never change a caption (schemas/affects.yaml), left out of the progress key

# One result per clip: the generated caption, or why the clip was rejected.
RESULT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("text_generated", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("seconds", pa.float64()),  # generation time per clip, for throughput reports
    ]
)

LEADING_PHRASES = re.compile(
    r"^\s*(?:"
    r"(?:the|this) (?:video|clip|footage|scene|sequence(?: of (?:frames|images))?|frames?|images?)"
    r" (?:shows|depicts|features|captures|presents|displays|showcases|is showing|begins with|opens with)"
    r"|in (?:the|this) (?:video|clip|footage|scene|sequence(?: of (?:frames|images))?|frames?|images?)"
    r"|(?:the|these) (?:frames|images) (?:show|depict|capture|display)"
    r")\s*[,:]?\s*",
    re.IGNORECASE,
)


def frame_indices(num_frames_in_clip: int, positions) -> list[int]:
    """Frame numbers at fractional `positions` of the clip (Open-Sora: int(n * p))."""
    if num_frames_in_clip < 1:
        raise ValueError(f"frame_indices: a clip needs at least one frame, got {num_frames_in_clip}")
    bad = [p for p in positions if not 0.0 <= p <= 1.0]
    if bad:
        raise ValueError(f"caption.positions must lie in [0, 1], got {bad}")
    return video.at_positions(num_frames_in_clip, positions)


def build_prompt(processor, num_images: int, prompt_text: str) -> str:
    """The model's own chat template with one image entry per frame, then the request."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt_text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def clean_caption(text: str) -> str:
    """Drop control characters and "The video shows"-style openings, collapse whitespace,
    capitalise the first letter."""
    # control/format characters and U+FFFD (a token cut inside a UTF-8 sequence) are noise
    text = "".join(" " if unicodedata.category(c)[0] == "C" or c == "\ufffd" else c for c in text)
    text = " ".join(text.split())
    text = LEADING_PHRASES.sub("", text, count=1).strip()
    return text[:1].upper() + text[1:]


_CAPTIONERS: dict[str, tuple] = {}


def load_captioner(model_ref: str, devices: tuple[torch.device, ...] | None = None) -> tuple:
    """(model, processor) for an id or path on one device (the job's first by default), or with
    its layers spread over several (accelerate's balanced device_map); loaded once per process."""
    devices = devices or tuple(job_devices()[:1])
    if (model_ref, devices) not in _CAPTIONERS:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = resolve_model_ref(model_ref)
        processor = AutoProcessor.from_pretrained(path)
        # batched generation appends new tokens on the right, so prompts pad on the left
        processor.tokenizer.padding_side = "left"
        dtype = model_dtype(devices[0])
        if len(devices) > 1:
            memory = {d.index: device_memory(d) - RESERVED for d in devices}
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, device_map="balanced",
                                                                max_memory=memory)
        else:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(devices[0])
        _CAPTIONERS[model_ref, devices] = (model.eval(), processor)
    return _CAPTIONERS[model_ref, devices]


def replica_devices(params: dict) -> list[tuple[torch.device, ...]]:
    """The devices of each replica the job runs: one per device where the model and a batch fit
    one, else one replica over all of them (see captioner_memory)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    devices = job_devices()
    config = AutoConfig.from_pretrained(resolve_model_ref(params["model"]))
    with torch.device("meta"):  # parameters counted without memory
        parameters = sum(p.numel() for p in AutoModelForImageTextToText.from_config(config).parameters())
    kind, why = placement(captioner_memory(parameters, config.to_dict(), params), device_memory(devices[0]),
                          len(devices))
    log.info("%s: %s", params["model"], why)
    if kind == "none":
        raise RuntimeError(f"caption: {params['model']} does not fit this job's devices: {why}; "
                           "lower caption.batch_size or give the job more GPUs (resources.caption.gpus)")
    return [tuple(devices)] if kind == "device_map" else [(d,) for d in devices]


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def prepare_inputs(processor, clips: list[torch.Tensor], prompt_text: str, device=None, dtype=None):
    """Processor inputs for a batch of clips ([T,H,W,3] uint8 each): every frame is an image."""
    from PIL import Image

    prompts = [build_prompt(processor, len(frames), prompt_text) for frames in clips]
    images = [Image.fromarray(frame.numpy()) for frames in clips for frame in frames]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    if device is not None:
        inputs = inputs.to(device)
    if dtype is not None and "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def clip_generator(seed: int, clip_id: str, device) -> torch.Generator:
    """A clip's own sampling generator, seeded from the caption seed and the clip's id alone."""
    digest = hashlib.sha256(f"{seed}:{clip_id}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class PerClipSampling(LogitsProcessor):
    """Samples each row's next token from its own generator and leaves only that token finite,
    so that greedy decoding picks it. generate's own sampling draws the whole batch from the one
    global generator, so a clip's caption depended on the clips batched with it (and so on
    caption.batch_size); here it depends on its seed and its own logits alone.

    The row's distribution is what generate(do_sample=True) samples from: the temperature, then
    the model's own top-k and top-p (transformers' defaults, 50 and 1.0, where it sets none)."""

    def __init__(self, generation_config, temperature: float, seed: int, clip_ids: list[str]):
        top_k = 50 if generation_config.top_k is None else generation_config.top_k
        top_p = 1.0 if generation_config.top_p is None else generation_config.top_p
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.seed, self.clip_ids, self.generators = seed, clip_ids, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:  # on the logits' device: the last layer's, when spread over several
            self.generators = [clip_generator(self.seed, clip_id, scores.device) for clip_id in self.clip_ids]
        probs = self.warpers(input_ids, scores).softmax(dim=-1)
        # row by row: a row's draw never depends on how many rows the batch holds
        chosen = torch.stack([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


@torch.no_grad()
def generate_captions(
    model, processor, clips: list[torch.Tensor], clip_ids: list[str], params: dict
) -> list[tuple[str, bool]]:
    """Caption a batch of clips; returns (decoded text, truncated) per clip, where
    truncated means no end-of-sequence token within max_new_tokens. At a temperature above 0
    each clip samples from its own generator (seed, clip id): its caption is the same in any batch."""
    tokenizer = processor.tokenizer
    inputs = prepare_inputs(processor, clips, params["prompt"], model.device, model.dtype)
    eos_ids = _eos_ids(model, tokenizer)
    sampling = []
    if params["temperature"] > 0:
        sampling = [PerClipSampling(model.generation_config, params["temperature"], params["seed"], clip_ids)]
    output = model.generate(
        **inputs,
        max_new_tokens=params["max_new_tokens"],
        min_new_tokens=params["min_new_tokens"],
        do_sample=False,  # PerClipSampling draws the tokens when sampling
        logits_processor=LogitsProcessorList(sampling),
        # image placeholders, padding and the like are never part of a caption
        suppress_tokens=sorted(set(tokenizer.all_special_ids) - eos_ids),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids),
        eos_token_id=sorted(eos_ids),
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    texts = processor.batch_decode(new_tokens, skip_special_tokens=True)
    finished = torch.isin(new_tokens, torch.tensor(sorted(eos_ids), device=new_tokens.device)).any(dim=1)
    return [(text, not done) for text, done in zip(texts, finished.tolist())]


def _validated(params: dict) -> dict:
    if params["existing_text"] not in EXISTING_TEXT_MODES:
        raise ValueError(f"caption.existing_text: {params['existing_text']!r} is not one of {EXISTING_TEXT_MODES}")
    if len(params["positions"]) != params["num_frames"]:
        raise ValueError(
            f"caption.positions has {len(params['positions'])} entries but caption.num_frames is {params['num_frames']}"
        )
    return params


def _verdict(text: str, truncated: bool, params: dict) -> tuple[str | None, str | None]:
    """(clean caption, None) for a usable caption, else (None, reject reason)."""
    caption = clean_caption(text)
    if not caption:
        return None, "empty caption"
    if truncated and params["reject_truncated"]:
        return None, f"truncated: no end of sequence within max_new_tokens={params['max_new_tokens']}"
    return caption, None


def _load_frames(path: str, num_frames, positions: list[float]) -> torch.Tensor:
    if pd.isna(num_frames) or num_frames < 1:
        num_frames = video.count_frames(path)  # the table does not know it: ask the decoder
    return video.read_frames(path, frame_indices(int(num_frames), positions))


def caption_batch(batch: pd.DataFrame, devices: tuple[torch.device, ...], params: dict) -> list[dict]:
    """A batch's results in its order, a caption or a reject reason per clip, from the replica on
    `devices` (loaded at its first batch)."""
    results, frames, ids = [], [], []
    for _, row in batch.iterrows():
        try:
            frames.append(_load_frames(row["path"], row["num_frames"], params["positions"]))
            ids.append(row["id"])
        except (ValueError, av.FFmpegError) as err:
            if not video.is_video_fault(err):
                raise  # the machine's fault (a missing clip file, an I/O error): fail, reject nothing
            results.append({"id": row["id"], "text_generated": None, "reason": f"cannot decode frames: {err}"})
    if frames:
        with use_device(devices[0]):
            model, processor = load_captioner(params["model"], devices)
            started = time.perf_counter()
            generated = generate_captions(model, processor, frames, ids, params)
        per_clip = (time.perf_counter() - started) / len(frames)
        for clip_id, (text, truncated) in zip(ids, generated):
            caption, reason = _verdict(text, truncated, params)
            results.append({"id": clip_id, "text_generated": caption, "reason": reason, "seconds": per_clip})
    return results


def caption_shard(table_path: str | Path, out_table: str | Path, rejects_path: str | Path, params: dict) -> dict:
    """Caption a shard's clips and write its table (text_generated, text) and rejects.

    existing_text: keep -> clips with a manifest caption keep it as `text` and are not
    captioned; replace -> every clip is captioned, `text` is the generated caption and the
    manifest caption is dropped; both -> like replace, but text_manifest stays beside it.
    Returns counts (clips, resumed from partial results, processed now, rejected) and seconds_per_clip.
    """
    params = _validated(params)
    table_path, out_table = Path(table_path), Path(out_table)
    clips = table.read(table_path)
    missing = sorted({"id", "path", "num_frames", "text_manifest"} - set(clips.columns))
    if missing:
        raise ValueError(f"{table_path}: clip table lacks columns {missing}")
    duplicated = sorted(clips.loc[clips["id"].duplicated(), "id"].unique())
    if duplicated:
        raise ValueError(f"{table_path}: clip ids are not unique: {duplicated[:5]}")

    has_manifest_text = clips["text_manifest"].fillna("").str.strip() != ""
    wanted = ~has_manifest_text if params["existing_text"] == "keep" else pd.Series(True, index=clips.index)

    settings = {k: v for k, v in params.items() if k not in OPERATIONAL}
    job = JobProgress(progress_folder(out_table), {"caption": settings, "model": input_signature(params["model"]),
                                                    "table": file_digest(table_path)})
    done = [result for batch in job.parts().values() for result in batch]
    todo = clips[wanted & ~clips["id"].isin([result["id"] for result in done])]
    resumed = int(wanted.sum()) - len(todo)
    if resumed:
        log.info("%s: resuming, %d clips already captioned", table_path, resumed)

    new_results = []
    batches = [todo.iloc[start : start + params["batch_size"]] for start in range(0, len(todo), params["batch_size"])]
    if batches:
        replicas = queue.SimpleQueue()  # each free replica's devices: a batch takes one, then returns it
        for devices in replica_devices(params):
            replicas.put(devices)

        def caption_on_a_replica(batch: pd.DataFrame) -> list[dict]:
            devices = replicas.get()
            try:
                return caption_batch(batch, devices, params)
            finally:
                replicas.put(devices)

        pool = ThreadPoolExecutor(replicas.qsize(), thread_name_prefix="caption")
        try:  # results in the shard's order, whichever replica finished first
            for results in progress(pool.map(caption_on_a_replica, batches), total=len(batches), desc="caption batches"):
                job.add(results[0]["id"], results)
                new_results.extend(results)
        finally:
            pool.shutdown(cancel_futures=True)

    # read back, as a retry reads them: the tables are the same either way
    results = [result for batch in job.parts().values() for result in batch]
    results = pd.DataFrame(results, columns=RESULT_SCHEMA.names).set_index("id")
    out = clips.copy()
    out["text_generated"] = out["id"].map(results["text_generated"])
    reasons = out["id"].map(results["reason"])
    if params["existing_text"] == "keep":
        out["text"] = out["text_manifest"].where(has_manifest_text, out["text_generated"])
    else:
        out["text"] = out["text_generated"]
        if params["existing_text"] == "replace":
            out["text_manifest"] = None
    rejected = reasons.notna()
    reject_rows = [
        {"id": row["id"], "url": row.get("url"), "stage": "caption", "reason": reason}
        for (_, row), reason in zip(out[rejected].iterrows(), reasons[rejected])
    ]
    table.write(out[~rejected], out_table)
    table.write_rejects(reject_rows, rejects_path)
    job.remove()

    timed = results["seconds"].dropna()
    summary = {
        "clips": len(clips),
        "resumed": resumed,
        "processed": len(new_results),
        "rejected": len(reject_rows),
        "seconds_per_clip": float(timed.mean()) if len(timed) else None,
    }
    log.info("%s: %s", out_table, summary)
    return summary
