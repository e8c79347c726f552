"""The `soraflow` command: every workflow step as a subcommand, for rules and for people.

Each subcommand parses its arguments and calls one function; the Snakemake rules run
these same commands, so a step behaves the same inside and outside the workflow.
Settings arrive as `--params JSON`: the step's section of the workflow config.
"""

from __future__ import annotations

import argparse
import json
import sys


def _params(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--params is not valid JSON ({err}): {text[:200]}") from err
    if not isinstance(value, dict):
        raise SystemExit("--params must be a JSON object")
    return value


def cmd_demo_videos(args) -> None:
    from soraflow.demo import make_demo_videos

    params = args.params
    make_demo_videos(params["out_dir"], params["videos"])


def cmd_shard(args) -> None:
    from soraflow.manifest import shard_manifest

    shard_manifest(args.manifest, args.shard_size, args.outputs)


def cmd_ingest(args) -> None:
    from soraflow.ingest import ingest_shard

    ingest_shard(args.table, args.raw_dir, args.out, args.rejects, args.params)


def cmd_split(args) -> None:
    from soraflow.split import split_shard

    split_shard(args.table, args.clip_dir, args.out, args.rejects, args.params)


def cmd_models(args) -> None:
    from soraflow.tiny_models import build_all

    build_all(args.out_dir, args.params)


def cmd_caption(args) -> None:
    from soraflow.caption import caption_shard

    caption_shard(args.table, args.out, args.rejects, args.params)


def cmd_encode_video(args) -> None:
    from soraflow.cache import encode_video_shard

    encode_video_shard(args.table, args.out, args.params["vae"], args.params["stage"])


def cmd_encode_text(args) -> None:
    from soraflow.cache import encode_text_shard

    encode_text_shard(args.table, args.out, args.params)


def cmd_dataset(args) -> None:
    from soraflow.dataset import build_stage_index

    build_stage_index(args.tables, args.latents, args.texts, args.params, args.out, args.rejects)


def cmd_train(args) -> None:
    from soraflow.train import Preempted, train

    try:
        train(args.index, args.out, args.run_dir, args.params, init_path=args.init)
    except Preempted as stop:
        raise SystemExit(f"preempted: {stop}") from None


def cmd_sample(args) -> None:
    from soraflow.sample import sample_prompts

    sample_prompts(args.checkpoint, args.params["sample"]["prompts"], args.outputs, args.params)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soraflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    def with_params(p, required=True):
        p.add_argument("--params", type=_params, required=required, help="the step's config section as JSON")
        return p

    with_params(command("demo-videos", cmd_demo_videos, "make the synthetic demo videos with known cuts"))

    p = command("shard", cmd_shard, "validate a manifest and split it into shard tables")
    p.add_argument("manifest")
    p.add_argument("--shard-size", type=int, required=True)
    p.add_argument("outputs", nargs="+", help="one table path per shard")

    p = with_params(command("ingest", cmd_ingest, "download and probe the videos of a shard table"))
    p.add_argument("table")
    p.add_argument("--raw-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rejects", required=True)

    p = with_params(command("split", cmd_split, "cut the videos of a table into scene clips"))
    p.add_argument("table")
    p.add_argument("--clip-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rejects", required=True)

    p = with_params(command("models", cmd_models, "build the tiny local models (random weights)"))
    p.add_argument("--out-dir", required=True)

    p = with_params(command("caption", cmd_caption, "caption the clips of a table with a LLaVA model"))
    p.add_argument("table")
    p.add_argument("--out", required=True)
    p.add_argument("--rejects", required=True)

    p = with_params(command("encode-video", cmd_encode_video, "cache VAE latents of a clip table"))
    p.add_argument("table")
    p.add_argument("--out", required=True)

    p = with_params(command("encode-text", cmd_encode_text, "cache text features of a captioned table"))
    p.add_argument("table")
    p.add_argument("--out", required=True)

    p = with_params(command("dataset", cmd_dataset, "join captions and caches into a stage's training index"))
    p.add_argument("--tables", nargs="+", required=True)
    p.add_argument("--latents", nargs="+", required=True)
    p.add_argument("--texts", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rejects", required=True)

    p = with_params(command("train", cmd_train, "train STDiT on a stage's index (run under torchrun)"))
    p.add_argument("index")
    p.add_argument("--out", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--init", default=None)

    p = with_params(command("sample", cmd_sample, "sample one video per prompt from a checkpoint"))
    p.add_argument("checkpoint")
    p.add_argument("outputs", nargs="+")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
