"""The `soraflow` command: every workflow step as a subcommand, for rules and for people.

Each subcommand parses its arguments and calls one function; the Snakemake rules run
these same commands, so a step behaves the same inside and outside the workflow.
Settings arrive as `--params JSON`: the step's section of the workflow config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _params(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--params is not valid JSON ({err}): {text[:200]}") from err
    if not isinstance(value, dict):
        raise SystemExit("--params must be a JSON object")
    return value


def cmd_demo_videos(args) -> None:
    from soraflow.demo.videos import make_demo_videos

    params = args.params
    make_demo_videos(params["out_dir"], params["videos"])


def cmd_shard(args) -> None:
    from soraflow.data.manifest import write_shard

    write_shard(args.manifest, args.shard_size, args.shard, args.out)


def cmd_export(args) -> None:
    from soraflow.data.export import export_shards

    counts = export_shards(args.shards_dir, args.num_shards, args.out, args.csv_v1_0, args.csv_v1_1, args.rejects,
                           args.dedup_rejects)
    print(f"export: {counts}")


def cmd_ingest(args) -> None:
    from soraflow.data.ingest import ingest_shard

    ingest_shard(args.table, args.raw_dir, args.out, args.rejects, args.params)


def _workflow_config(args) -> dict:
    """The workflow config as the Snakefile assembles it: --defaults, then the --configfile files
    key by key (their stages whole), then the --config values; validated, with the schema's defaults."""
    import yaml
    from snakemake.cli import parse_config
    from snakemake.utils import update_config

    from soraflow.workflow.settings import stages_as_listed, with_defaults

    files = [args.defaults, *args.configfile]
    for path in map(Path, files):
        if not path.exists():
            raise SystemExit(f"config file {path} not found: pass the step's --params, or --configfile FILE "
                             "(over --defaults, by default workflow_config.yaml)")
    config = yaml.safe_load(Path(args.defaults).read_text()) or {}
    for path in args.configfile:
        update_config(config, yaml.safe_load(Path(path).read_text()) or {})
    overrides = parse_config(args.config)
    update_config(config, overrides)
    stages_as_listed(config, args.configfile, overrides)
    try:
        return with_defaults(config, source=" + ".join(files))
    except ValueError as error:  # a wrong key or type: the message names it
        raise SystemExit(str(error)) from None


def _config_section(args, section: str) -> dict:
    """--params if given, else the section of the workflow config (_workflow_config)."""
    return args.params if args.params is not None else _workflow_config(args)[section]


def _clip_table(inputs: list[str], work_dir: Path, args) -> str:
    """A clip table as given, or one made from video files (copied and probed like the ingest rule)."""
    if len(inputs) == 1 and inputs[0].endswith(".parquet"):
        return inputs[0]
    import pandas as pd

    from soraflow.data import table
    from soraflow.data.ingest import ingest_shard

    ids = [Path(p).stem for p in inputs]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"video file names must be unique: {inputs}")
    manifest = work_dir / "videos_manifest.parquet"
    table.write(pd.DataFrame({"id": ids, "video_id": ids, "url": [str(Path(p).resolve()) for p in inputs]}), manifest)
    videos = work_dir / "videos.parquet"
    ingest_params = _workflow_config(args)["ingest"]
    ingest_shard(manifest, work_dir / "raw", videos, work_dir / "rejects_ingest.parquet", ingest_params)
    return str(videos)


def cmd_split(args) -> None:
    from soraflow.data.split import split_shard

    out_dir = Path(args.out_dir)
    params = _config_section(args, "split")
    if args.threads is not None:  # the job's threads, as Snakemake gives them
        params = {**params, "threads": args.threads}
    clips = _clip_table(args.inputs, out_dir, args)
    out = args.out or str(out_dir / "clips.parquet")
    rejects = args.rejects or str(out_dir / "rejects_split.parquet")
    split_shard(clips, args.clip_dir or str(out_dir), out, rejects, params, drop_raw_in=args.drop_raw)
    print(f"clip table: {out}")


def cmd_score(args) -> None:
    from soraflow.scoring.shard import score_shard

    score_shard(args.table, args.out, args.params, args.rejects)


def cmd_dedup(args) -> None:
    from soraflow.data.manifest import shard_table_paths
    from soraflow.scoring.dedup import dedup_corpus

    tables = shard_table_paths(args.shards_dir, args.num_shards, "scored")
    dropped = dedup_corpus(tables, args.out, args.params["max_distance"], args.params.get("threads", 1))
    print(f"dedup: {dropped} near-duplicate clips left out")


def cmd_match(args) -> None:
    from soraflow.scoring.shard import match_shard

    match_shard(args.table, args.out, args.params)


def cmd_models(args) -> None:
    from soraflow.demo.models import build_all

    build_all(args.out_dir, args.params)


def cmd_tiny_wan(args) -> None:
    from soraflow.demo.models import build_tiny_wan

    build_tiny_wan(args.out)


def cmd_caption(args) -> None:
    from soraflow.data import table
    from soraflow.scoring.caption import caption_shard

    out_dir = Path(args.out_dir)
    params = _config_section(args, "caption")
    clips = _clip_table(args.inputs, out_dir, args)
    out = args.out or str(out_dir / "captioned.parquet")
    caption_shard(clips, out, args.rejects or str(out_dir / "rejects_caption.parquet"), params)
    if args.out is None:  # a person ran this: show the captions
        for row in table.read(out).itertuples():
            print(f"{row.id}: {row.text}")


def cmd_encode_video(args) -> None:
    from soraflow.training.encode import encode_video_shard

    encode_video_shard(args.table, args.out, args.params["vae"], args.params["stage"], args.rejects)


def cmd_encode_text(args) -> None:
    from soraflow.training.encode import encode_text_shard

    encode_text_shard(args.table, args.out, args.params)


def cmd_dataset(args) -> None:
    from soraflow.data.cache import shard_cache_paths
    from soraflow.data.manifest import shard_table_paths
    from soraflow.training.dataset import build_stage_index

    tables = shard_table_paths(args.shards_dir, args.num_shards, "captioned")
    scores = shard_table_paths(args.shards_dir, args.num_shards, "scored")
    matches = shard_table_paths(args.shards_dir, args.num_shards, "matched")
    latents = shard_cache_paths(args.latent_dir, args.num_shards)
    texts = shard_cache_paths(args.text_dir, args.num_shards)
    dropped = [path for name in ("rejects_score", f"rejects_encode_video_{args.stage}")
               for path in shard_table_paths(args.shards_dir, args.num_shards, name)]  # fmt: skip
    dropped += [args.dedup] if args.dedup else []
    build_stage_index(tables, scores, latents, texts, args.params["stage"], args.out, args.rejects, dropped,
                      args.params["validation"]["fraction"], args.validation, matched_tables=matches)


def cmd_train(args) -> None:
    import os

    from soraflow.training import failure, launch

    if "RANK" not in os.environ:  # the job's own process, not a torchrun worker
        earlier = failure.recorded(args.run_dir, args.attempt)
        if earlier:
            raise SystemExit(f"not run again: an earlier attempt failed in a way a retry repeats: {earlier}")
        if failure.stopped_in_this_job(args.run_dir, os.environ):
            raise SystemExit("not run again in this Slurm job: training stopped in it for its time limit or a "
                             "preemption; the next job resumes it")
    if launch.needs_launch(args.nproc, args.nodes, os.environ):
        argv = ["train", args.index, "--out", args.out, "--run-dir", args.run_dir,
                "--params", json.dumps(args.output_settings), "--operational", json.dumps(args.operational)]
        argv += ["--init", args.init] if args.init else []
        argv += ["--loss-log", args.loss_log] if args.loss_log else []
        for flag, value in (("--validation-index", args.validation_index), ("--validation-log", args.validation_log)):
            argv += [flag, value] if value else []
        argv += ["--sampling", json.dumps(args.sampling)] if args.sampling else []
        code = launch.launch(args.nproc, args.nodes, argv, os.environ)
        if code:
            raise SystemExit(f"training exited with status {code} (preempted or failed; see the log above)")
        return
    from soraflow.training.loop import Preempted, train

    try:
        train(args.index, args.out, args.run_dir, args.params, args.output_settings, init_path=args.init,
              loss_out=args.loss_log, validation_index=args.validation_index, validation_out=args.validation_log,
              sampling=args.sampling)
    except Preempted as stop:
        raise SystemExit(f"preempted: {stop}") from None


def cmd_sample_grid(args) -> None:
    from soraflow.inference.grid import sample_grid

    sample_grid(args.weights, args.out, args.settings, args.steps, args.validation_index, args.captions)


def cmd_sample(args) -> None:
    from soraflow.inference.sample import sample_prompts, sample_training_captions
    from soraflow.models.checkpoint import is_torch_checkpoint

    pth = is_torch_checkpoint(args.ckpt)
    if args.params is None:
        sections = ("sample", "text_encoder", "vae", "diffusion") + (("stdit",) if pth else ())
        config = _workflow_config(args)
        args.params = {key: config[key] for key in sections}
    if pth:
        args.params = _pth_settings(args, args.params)
    if args.from_captions:
        if not args.index or len(args.comparison) != 2:
            raise SystemExit("--from-captions needs --index (the stage's training index) and --comparison PNG CSV")
        sample_training_captions(args.ckpt, args.index, args.from_captions, *args.comparison, args.params)
    prompts = args.prompt or args.params["sample"]["prompts"]
    outputs = args.out or [str(Path(args.out_dir) / f"sample_{k:02d}.mp4") for k in range(len(prompts))]
    sample_prompts(args.ckpt, prompts, outputs, args.params)


def _pth_settings(args, params: dict) -> dict:
    """A .pth (PixArt-α, Open-Sora 1.0) holds weights only: the STDiT settings come from the
    config's stdit section with the flags over it, the video size from the flags."""
    flags = {"preset": args.preset, "space_scale": args.space_scale, "time_scale": args.time_scale}
    stdit = {**params.get("stdit", {}), **{k: v for k, v in flags.items() if v is not None}}
    if args.num_frames is None or args.resolution is None or "preset" not in stdit:
        raise SystemExit(
            f"{args.ckpt} holds weights only: give --num-frames and --resolution, and the STDiT settings "
            "(--preset, --space-scale, or --configfile files with a stdit section); "
            "OpenSora-v1-HQ-16x512x512.pth: --num-frames 16 --resolution 512 --preset STDiT-XL/2 --space-scale 1.0"
        )
    return {**params, "stdit": stdit, "size": {"num_frames": args.num_frames, "resolution": args.resolution}}


def cmd_export_checkpoint(args) -> None:
    if args.format == "diffusers-lora":
        from soraflow.models.wan import export_stage_lora

        print(export_stage_lora(args.ckpt, args.out, use_ema=args.weights == "ema"))
        return
    from soraflow.models.checkpoint import export_opensora

    print(export_opensora(args.ckpt, args.out, use_ema=args.weights == "ema"))


def cmd_report_figures(args) -> None:
    from soraflow.workflow.report import make_figures

    losses = dict(item.split("=", 1) for item in args.loss)
    validation = {stage: {"validation": csv_path, "run_dir": run_dir}
                  for stage, csv_path, run_dir in (item.split("=", 2) for item in args.validation)}  # fmt: skip
    stage_rejects = dict(item.split("=", 1) for item in args.stage_rejects)
    make_figures(args.clips, args.rejects, losses, args.out_dir, validation if args.validation else None,
                 args.overfit_evaluations, stage_rejects or None)


def cmd_plan(args) -> None:
    from soraflow.workflow.resources import check

    config = _workflow_config(args)
    try:
        print(check(config))
    except ValueError as error:  # a config that does not fit (PlanError)
        raise SystemExit(str(error)) from None


def cmd_inspect(args) -> None:
    from soraflow.data.stats import inspect_tables

    print(inspect_tables(args.root))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soraflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    def with_params(p):
        p.add_argument("--params", type=_params, required=True, help="the step's output-changing settings as JSON")
        p.add_argument("--operational", type=_params, default={},
                       help="the step's settings that never change its outputs (retries, batch sizes, ...) as JSON")
        return p

    with_params(command("demo-videos", cmd_demo_videos, "make the synthetic demo videos with known cuts"))

    p = command("shard", cmd_shard, "validate a manifest and write one shard's table")
    p.add_argument("manifest")
    p.add_argument("--shard-size", type=int, required=True)
    p.add_argument("--shard", type=int, required=True, help="which shard (0-based)")
    p.add_argument("--out", required=True, help="the shard's table (parquet)")

    # rules over every shard pass the folder and the count: 10k paths pass the kernel's
    # limit on one command-line argument
    p = command("export", cmd_export, "all shards' captioned clips as one table and Open-Sora's CSVs, all rejects")
    p.add_argument("--shards-dir", required=True, help="the workflow's shard folder (data/shards)")
    p.add_argument("--num-shards", type=int, required=True)
    p.add_argument("--out", required=True, help="clip table (parquet)")
    p.add_argument("--opensora-v1.0-csv", dest="csv_v1_0", required=True,
                   help="Open-Sora 1.0's CSV: path,text,num_frames, no header")
    p.add_argument("--opensora-v1.1-csv", dest="csv_v1_1", required=True,
                   help="Open-Sora 1.1+'s CSV: a header, path,text,num_frames,width,height,aspect_ratio,fps,resolution")
    p.add_argument("--rejects", required=True, help="rejects table (parquet)")
    p.add_argument("--dedup-rejects", help="the dedup step's rejects (near-duplicates), listed after the shards'")

    p = with_params(command("ingest", cmd_ingest, "download and probe the videos of a shard table"))
    p.add_argument("table")
    p.add_argument("--raw-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rejects", required=True)

    def with_workflow_config(p):
        """The workflow config, given as to snakemake."""
        p.add_argument("--configfile", nargs="+", action="extend", default=[], metavar="FILE",
                       help="config files over the defaults, each over the one before it key by key, as snakemake's")
        p.add_argument("--config", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="values over those, as snakemake's")
        p.add_argument("--defaults", default="workflow_config.yaml", help="the default config (default: workflow_config.yaml)")
        return p

    def with_config(p):
        p.add_argument("--params", type=_params, help="the step's settings as JSON (default: from the workflow config)")
        p.add_argument("--operational", type=_params, default={}, help="with --params: its operational settings as JSON")
        return with_workflow_config(p)

    p = with_config(command("split", cmd_split, "cut videos (files, or a clip table) into scene clips"))
    p.add_argument("inputs", nargs="+", metavar="VIDEO_OR_TABLE")
    p.add_argument("--out-dir", default="clips", help="where clips and tables go (default: clips/)")
    p.add_argument("--clip-dir", help="clip folder (default: --out-dir)")
    p.add_argument("--out", help="clip table (default: OUT_DIR/clips.parquet)")
    p.add_argument("--rejects", help="rejects table (default: OUT_DIR/rejects_split.parquet)")
    p.add_argument("--threads", type=int, help="videos split at once (default: the settings' threads)")
    p.add_argument("--drop-raw", metavar="RAW_DIR",
                   help="delete the videos' raw files that lie in RAW_DIR once both tables are written")

    p = with_params(command("score", cmd_score, "motion, aesthetic, text-area and pHash scores of a clip table"))
    p.add_argument("table")
    p.add_argument("--out", required=True)
    p.add_argument("--rejects", help="rejects table: clips that do not decode (without it, such a clip is an error)")

    p = with_params(command("dedup", cmd_dedup, "near-duplicate clips across every shard's scored table, by pHash"))
    p.add_argument("--shards-dir", required=True, help="the workflow's shard folder (data/shards)")
    p.add_argument("--num-shards", type=int, required=True)
    p.add_argument("--out", required=True, help="rejects table: the near-duplicates every stage leaves out")

    p = with_params(command("match", cmd_match, "caption-video match (CLIP) of a captioned clip table"))
    p.add_argument("table")
    p.add_argument("--out", required=True)

    p = with_params(command("models", cmd_models, "build the tiny local models (random weights)"))
    p.add_argument("--out-dir", required=True)

    p = command("tiny-wan", cmd_tiny_wan, "build the tiny random-weight Wan 2.1 pipeline (the Wan family's demo)")
    p.add_argument("--out", required=True)

    p = with_config(command("caption", cmd_caption, "caption clips (files, or a clip table) with a LLaVA model"))
    p.add_argument("inputs", nargs="+", metavar="CLIP_OR_TABLE")
    p.add_argument("--out-dir", default="captions", help="where tables go (default: captions/)")
    p.add_argument("--out", help="captioned table (default: OUT_DIR/captioned.parquet, and captions printed)")
    p.add_argument("--rejects", help="rejects table (default: OUT_DIR/rejects_caption.parquet)")

    p = with_params(command("encode-video", cmd_encode_video, "cache VAE latents of a clip table"))
    p.add_argument("table")
    p.add_argument("--out", required=True)
    p.add_argument("--rejects", help="rejects table: clips too short for the stage or that do not decode "
                                     "(without it, such a clip is an error)")

    p = with_params(command("encode-text", cmd_encode_text, "cache text features of a captioned table"))
    p.add_argument("table")
    p.add_argument("--out", required=True)

    p = with_params(command("dataset", cmd_dataset, "join captions and caches into a stage's training index"))
    p.add_argument("--shards-dir", required=True, help="folder of the shards' captioned, scored and matched tables")
    p.add_argument("--num-shards", type=int, required=True)
    p.add_argument("--latent-dir", required=True, help="folder of the stage's latent cache files")
    p.add_argument("--text-dir", required=True, help="folder of the text feature cache files")
    p.add_argument("--stage", required=True, help="the stage (its encode jobs' rejects tables are named for it)")
    p.add_argument("--out", required=True)
    p.add_argument("--rejects", required=True)
    p.add_argument("--validation", default=None, help="where the stage's held-out clips go (validation.fraction)")
    p.add_argument("--dedup", help="the dedup step's rejects table: near-duplicates, left out and in --rejects")

    p = with_params(command("train", cmd_train, "train STDiT on a stage's index (run under torchrun)"))
    p.add_argument("index")
    p.add_argument("--out", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--init", default=None)
    p.add_argument("--loss-log", default=None, help="where to copy the finished run's loss log")
    p.add_argument("--validation-index", default=None, help="the stage's held-out clips (validation.fraction)")
    p.add_argument("--validation-log", default=None, help="where to copy the finished run's validation log")
    p.add_argument("--sampling", type=_params, default=None,
                   help="the sample step's settings (JSON) for the sample grids every validation.sample_every steps")
    p.add_argument("--nproc", type=int, default=1, help="processes per node; >1 starts torchrun")
    p.add_argument("--nodes", type=int, default=1, help="nodes; >1 starts srun + torchrun inside a Slurm job")
    p.add_argument("--attempt", type=int, default=1,
                   help="Snakemake's attempt: a retry exits at once after a failure a retry repeats (NaN loss, bad settings)")

    p = command("sample-grid", cmd_sample_grid, "a grid of samples of weights during training (prompts, validation captions)")
    p.add_argument("weights", help="a checkpoint file of one set of weights")
    p.add_argument("--out", required=True, help="the PNG")
    p.add_argument("--settings", type=_params, required=True, help="the sample step's settings, all of them (JSON)")
    p.add_argument("--steps", type=int, required=True, help="sampling steps")
    p.add_argument("--validation-index", default=None)
    p.add_argument("--captions", type=int, default=0, help="validation captions sampled, each beside its clip")

    p = with_config(command("sample", cmd_sample, "sample one video per prompt from a checkpoint"))
    p.add_argument("--ckpt", required=True,
                   help="a stage checkpoint (results/checkpoints/STAGE.safetensors), or a PixArt-α or Open-Sora 1.0 .pth")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: the config's prompts)")
    p.add_argument("--out", nargs="+", help="output mp4 paths, one per prompt")
    p.add_argument("--out-dir", default="samples", help="where samples go without --out (default: samples/)")
    p.add_argument("--index", help="the stage's training index, for --from-captions")
    p.add_argument("--from-captions", nargs="*", default=[], metavar="MP4",
                   help="also sample this many training clips' captions, one output path each")
    p.add_argument("--comparison", nargs="*", default=[], metavar="PNG CSV",
                   help="figure and table setting each --from-captions sample beside its training clip")
    pth = p.add_argument_group("a .pth checkpoint", "it holds weights only; these and the config's stdit section say the rest")
    pth.add_argument("--num-frames", type=int, help="frames per video (16 for Open-Sora 1.0's models)")
    pth.add_argument("--resolution", type=int, help="square video size in pixels (256 or 512 for Open-Sora 1.0's)")
    pth.add_argument("--preset", help="STDiT preset (STDiT-XL/2 for Open-Sora 1.0's), over the config's")
    pth.add_argument("--space-scale", type=float, help="0.5 for Open-Sora 1.0's 256 px models, 1.0 for 512 px")
    pth.add_argument("--time-scale", type=float, help="1.0 for Open-Sora 1.0's 16-frame models")

    p = command("export-checkpoint", cmd_export_checkpoint,
                "write a stage checkpoint as a .pth Open-Sora 1.0 loads, and print the settings its config needs")
    p.add_argument("ckpt", help="a stage checkpoint (results/checkpoints/STAGE.safetensors)")
    p.add_argument("--out", required=True, help="the .pth to write (diffusers-lora: the folder)")
    p.add_argument("--format", choices=["opensora", "diffusers-lora"], required=True,
                   help="whose layout: opensora (Open-Sora 1.0's STDiT) or diffusers-lora (a Wan stage's LoRA, "
                        "which WanPipeline.load_lora_weights loads)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA (default) or raw weights")

    p = command("report-figures", cmd_report_figures, "dataset plots, clip gallery and loss curves for the report")
    p.add_argument("--clips", required=True, help="the exported clip table")
    p.add_argument("--rejects", required=True, help="the exported rejects table")
    p.add_argument("--loss", nargs="+", default=[], metavar="STAGE=CSV", help="loss logs by stage")
    p.add_argument("--validation", nargs="+", default=[], metavar="STAGE=CSV=RUN_DIR",
                   help="validation logs and run folders (their sample grids) by stage: validation.html")
    p.add_argument("--overfit-evaluations", type=int, default=3,
                   help="validation losses in a row that rose while training loss fell: a warning")
    p.add_argument("--stage-rejects", nargs="+", default=[], metavar="STAGE=PARQUET",
                   help="each stage's rejects table: filters.html, what each filter removed")
    p.add_argument("--out-dir", required=True)

    p = command("plan", cmd_plan, "tokens, FLOPs, memory per GPU, cache sizes and GPU-hours of every stage of a "
                "config, and every job's planned runtime and memory; exits non-zero naming what does not fit "
                "the planned GPU (plan.gpu)")
    with_workflow_config(p)

    p = command("inspect", cmd_inspect, "summarise the clip tables and rejects of a workflow run")
    p.add_argument("--root", default="data", help="the workflow's data.root (default: data)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "params", None) is not None:
        from soraflow.workflow.settings import merged

        # the rules pass the two halves apart (only the first re-runs a job); the step takes both
        args.output_settings, args.params = args.params, merged(args.params, args.operational)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
