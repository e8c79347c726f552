"""Preemption on two CPU ranks, before and after a change: time from the stop signal to the exit,
peak host memory of a fresh run and of a resumed one, and the cost of the per-step stop flag (issue 22).

    .venv/bin/python benchmarks/bench_preempt.py [--base REV] [--preset STDiT-B/2] [--engines ddp fsdp]
                                                 [--log-every 10] [--tokens 2] [--frames 2]

Each variant trains the same model on the same synthetic cache with the real
`soraflow train --nproc 2` (torchrun, gloo, fp32, one torch thread per rank): "before" from a
temporary `git worktree` of --base (its src/ on PYTHONPATH, ahead of the venv's editable install
of this tree), "after" from this working tree. Per engine and variant:

    fresh    a new run; SIGTERM to the launcher right after its first loss row (step log_every):
             the worst case for a stop that waits for the next log step (log_every - 1 steps;
             half of that on average), no different for one checked after every step
    resumed  the same command again: it resumes that checkpoint, trains to its next loss row, and
             is stopped the same way
    deadline (after only) the same command once more, as a chain's next link: told that its job
             ends (SLURM_JOB_END_TIME) DEADLINE_S after it starts, how long before that end it
             had exited, with no signal at all

"signal -> exit" is the launcher's exit after the signal; "checkpoint write" the seconds the
after code measured for its last checkpoint (state.json). Memory: every process of the run is
polled (RSS, every 20 ms); a run's peak is the largest sum over its processes at one poll, so
"resumed - fresh" is what resuming holds beyond training; "largest rank's peak" is a rank's VmHWM.
The stop flag: 2 gloo processes all-reduce a one-element flag 2,000 times (median per call),
against the step time of the fresh runs (their loss log's seconds per step).

`--parts identity` times a run's identity at start-up on a synthetic stage of --shards shards,
each a latent and a text cache of CHUNKS_PER_SHARD chunk files of ROWS_PER_CHUNK clips, and an
initial-weights file of --init-mib: before, every rank of every link of a chain opened every
chunk's header (cache.chunk_metadata here, the same read) and hashed the weights (both timed;
reading the index and hashing it, which both do, left out); after, rank 0
hashes the shard caches' indexes and the weights at a chain's first link, and the next links find
every digest remembered (a stat per file).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from tables import print_table

from soraflow.models.stdit import build_model
from soraflow.workflow import settings

REPO = Path(__file__).resolve().parents[1]
BASE = "1c882bb3d161b238ac1c79049c8894928478d995"  # before issue 22: a stop waited for the next log step
CLIPS, CAPTION_DIM = 16, 384
POLL_S = 0.02
DEADLINE_S = 120  # the deadline run's job ends this long after its start


# a one-shard cache as the encode jobs write it (index + chunk files) and its stage index, written
# by the measured tree's own code (the chunk format changed since the base revision)
CACHE_SCRIPT = """
import sys
from pathlib import Path

import pandas as pd
import torch

try:
    from soraflow.data import cache
except ImportError:  # before the cache moved to the data layer
    from soraflow.training import cache
from soraflow.data import table

root = Path(sys.argv[1])
clips, frames, side, caption_len, caption_dim = map(int, sys.argv[2:])
g = torch.Generator().manual_seed(0)
ids = [f"clip{i}" for i in range(clips)]
mask = torch.ones(clips, caption_len, dtype=torch.long)
where = {}
for name, tensors in (("latents", {"latents": torch.randn(clips, 4, frames, side, side, generator=g)}),
                      ("text", cache.text_tensors(torch.randn(clips, caption_len, caption_dim, generator=g), mask))):
    store = cache.ChunkStore(root / f"{name}.json", {"bench": name})
    store.add(ids, ids, tensors)
    store.finish(ids, ids)
    where[name] = cache.locate(root / f"{name}.json")
table.write(pd.DataFrame({
    "id": ids, "latent_path": [where["latents"][i][0] for i in ids], "latent_index": [where["latents"][i][1] for i in ids],
    "text_emb_path": [where["text"][i][0] for i in ids], "text_emb_index": [where["text"][i][1] for i in ids],
}), root / "index.parquet")
"""


def latent_index(src: Path, root: Path, frames: int, tokens: int, caption_len: int) -> Path:
    """The synthetic cache (latents 4 x frames x 2*tokens x 2*tokens: patch 2 gives tokens^2 per
    frame) written by the tree whose src/ is `src`; its stage index."""
    root.mkdir(parents=True)
    args = [str(root), *(str(n) for n in (CLIPS, frames, 2 * tokens, caption_len, CAPTION_DIM))]
    subprocess.run([sys.executable, "-c", CACHE_SCRIPT, *args], env={**os.environ, "PYTHONPATH": str(src)}, check=True)
    return root / "index.parquet"


def settings_for(engine: str, preset: str, log_every: int) -> tuple[dict, dict]:
    """(params, operational) of the default config's stage1 training step, as the train rule passes them."""
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config["stdit"] = {"preset": preset}
    config["stages"]["stage1"].update(steps=100_000, batch_size=2, init=None)
    config["train"].update(engine=engine, nproc_per_node=2, mixed_precision="fp32", log_every=log_every,
                           checkpoint_every=100_000, data_workers=0, grad_checkpointing=False)
    config = settings.with_defaults(config)
    return settings.params(config, "train", "stage1"), settings.operational(config, "train", "stage1")


def tree(pid: int) -> list[int]:
    """pid and its descendants (those that exit while read are left out)."""
    found = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += tree(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB, and the RANK of a torchrun worker (-1 otherwise)."""
    out = {"rank": -1}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks = [item[5:] for item in environ if item.startswith(b"RANK=")]
        if ranks:
            out["rank"] = int(ranks[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


class Run:
    """One `soraflow train --nproc 2` of a source tree, its output lines and memory polled."""

    def __init__(self, src: Path, index: Path, run_dir: Path, params: dict, operational: dict, env: dict | None = None):
        cmd = [sys.executable, "-m", "soraflow.cli", "train", str(index), "--out", str(run_dir.parent / "out.safetensors"),
               "--run-dir", str(run_dir), "--nproc", "2", "--params", json.dumps(params),
               "--operational", json.dumps(operational)]  # fmt: skip
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(src), **(env or {})}
        self.run_dir, self.started = run_dir, time.monotonic()
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        self.lines: list[tuple[float, str]] = []
        self.samples: list[tuple[float, int]] = []  # (time, summed RSS KiB)
        self.rank_hwm: dict[int, int] = {}
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._poll, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line))

    def _poll(self):
        while self.process.poll() is None:
            stats = [status(pid) for pid in tree(self.process.pid)]
            self.samples.append((time.monotonic(), sum(s.get("VmRSS", 0) for s in stats)))
            for s in stats:
                if s["rank"] >= 0:
                    self.rank_hwm[s["rank"]] = max(self.rank_hwm.get(s["rank"], 0), s.get("VmHWM", 0))
            time.sleep(POLL_S)

    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def logged_steps(self) -> list[int]:
        log = self.run_dir / "loss.csv"
        try:
            return pd.read_csv(log)["step"].tolist() if log.exists() else []
        except (pd.errors.EmptyDataError, KeyError):
            return []  # being written

    def wait_for_a_new_row(self, after: int, timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        while not [s for s in self.logged_steps() if s > after]:
            if self.process.poll() is not None:
                raise RuntimeError(f"training exited early:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no loss row past step {after}:\n{self.output()[-4000:]}")
            time.sleep(POLL_S)

    def wait(self) -> float:
        self.process.wait(timeout=1800)
        exited = time.monotonic()
        time.sleep(0.2)  # the reader's last lines
        return exited

    def peak_mib(self, start: float, end: float) -> float:
        return max((kib for t, kib in self.samples if start <= t <= end), default=0) / 1024


def stop_and_measure(run: Run, after_step: int) -> dict:
    """Signal the run after its first loss row past after_step; what it took."""
    run.wait_for_a_new_row(after_step)
    signalled = time.monotonic()
    run.process.send_signal(signal.SIGTERM)
    exited = run.wait()
    if run.process.returncode == 0:
        raise RuntimeError(f"the run finished instead of stopping:\n{run.output()[-3000:]}")
    log = pd.read_csv(run.run_dir / "loss.csv")
    first = log[log["step"] > after_step].iloc[0]  # its seconds count from this run's first step
    return {"signal_to_exit_s": exited - signalled, "peak_mib": run.peak_mib(run.started, exited),
            "rank_peak_mib": max(run.rank_hwm.values()) / 1024, "step_s": first["seconds"] / (first["step"] - after_step)}


def last_checkpoint(run_dir: Path) -> dict:
    return json.loads(sorted(run_dir.glob("step-*/state.json"))[-1].read_text())


def measure(src: Path, index: Path, root: Path, engine: str, preset: str, log_every: int, deadline: bool) -> dict:
    """A fresh run stopped, the same run resumed and stopped, and (deadline) resumed again under a
    job end time: what each took."""
    params, operational = settings_for(engine, preset, log_every)
    run_dir = root / "run"
    result = {"fresh": stop_and_measure(Run(src, index, run_dir, params, operational), 0)}
    result["resumed"] = stop_and_measure(Run(src, index, run_dir, params, operational), last_checkpoint(run_dir)["step"])
    result["write_s"] = last_checkpoint(run_dir).get("write_seconds")  # measured by the after code only
    if deadline:  # the next link of a chain: it knows its checkpoint's write time
        end = int(time.time()) + DEADLINE_S
        run = Run(src, index, run_dir, params, operational, env={"SLURM_JOB_END_TIME": str(end)})
        exited = run.wait()
        result["deadline"] = {"exited_before_end_s": end - time.time() + (time.monotonic() - exited),
                              "returncode": run.process.returncode}
    return result


CHUNKS_PER_SHARD, ROWS_PER_CHUNK = 335, 15  # 100 shards: 67k chunk files, 500k clips per cache


def identity_costs(root: Path, shards: int, init_mib: int) -> list[tuple]:
    """Seconds of the identity's reads, before (per rank and link) and after (rank 0)."""
    from soraflow.data import cache, table
    from soraflow.training.identity import file_digest, identity_parts

    cache.CHUNK_BYTES = 4 * ROWS_PER_CHUNK  # rows of one float32: ROWS_PER_CHUNK rows per chunk file
    rows = pd.DataFrame()
    for shard in range(shards):
        ids = [f"s{shard}c{i}" for i in range(CHUNKS_PER_SHARD * ROWS_PER_CHUNK)]
        where = {}
        for name in ("latents", "text"):
            store = cache.ChunkStore(root / name / f"{shard:05d}.json", {"cache": name})
            for first in range(0, len(ids), ROWS_PER_CHUNK):
                batch = ids[first : first + ROWS_PER_CHUNK]
                store.add(batch, batch, {"x": torch.zeros(len(batch), 1)})
            store.finish(ids, ids)
            where[name] = cache.locate(root / name / f"{shard:05d}.json")
        rows = pd.concat([rows, pd.DataFrame({
            "id": ids, "latent_path": [where["latents"][i][0] for i in ids], "latent_index": [where["latents"][i][1] for i in ids],
            "text_emb_path": [where["text"][i][0] for i in ids], "text_emb_index": [where["text"][i][1] for i in ids]})])  # fmt: skip
    table.write(rows.reset_index(drop=True), root / "index.parquet")
    init = root / "init.safetensors"
    with init.open("wb") as f:
        for _ in range(init_mib):
            f.write(os.urandom(2**20))
    chunks = sorted({*rows["latent_path"], *rows["text_emb_path"]})

    started = time.perf_counter()
    for chunk in chunks:
        cache.chunk_metadata(chunk)
    headers_s = time.perf_counter() - started
    started = time.perf_counter()
    file_digest(init)
    init_s = time.perf_counter() - started
    started = time.perf_counter()
    identity_parts({}, root / "index.parquet", init, root / "digests.json")
    first_link_s = time.perf_counter() - started
    started = time.perf_counter()
    identity_parts({}, root / "index.parquet", init, root / "digests.json")
    next_link_s = time.perf_counter() - started
    return [(f"{len(rows):,} clips, {shards} shards x 2 caches, {len(chunks):,} chunk files, {init_mib:,} MiB init",
             f"{headers_s + init_s:.1f} (headers {headers_s:.1f}, init {init_s:.1f})", f"{first_link_s:.1f}",
             f"{next_link_s:.2f}")]


def flag_worker(rank: int, port: int, calls: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    flag = torch.zeros(1)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        times.append(time.perf_counter() - started)
    if rank == 0:
        out.put(statistics.median(times))
    dist.destroy_process_group()


def flag_cost_s(calls: int = 2000) -> float:
    """Median seconds of one all-reduce of a one-element flag between 2 gloo processes."""
    context = mp.get_context("spawn")
    out = context.Queue()
    port = 29000 + os.getpid() % 1000
    workers = [context.Process(target=flag_worker, args=(rank, port, calls, out)) for rank in range(2)]
    for w in workers:
        w.start()
    cost = out.get(timeout=300)
    for w in workers:
        w.join()
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE, help="the revision measured as 'before' (default: %(default).10s)")
    parser.add_argument("--preset", default="STDiT-B/2")
    parser.add_argument("--engines", nargs="+", default=["ddp", "fsdp"])
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=2, help="tokens per side of a frame (S = tokens^2)")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=["preempt", "identity"], default=["preempt", "identity"])
    parser.add_argument("--shards", type=int, default=100, help="the identity part's stage (see the docstring)")
    parser.add_argument("--init-mib", type=int, default=1024, help="the identity part's initial weights")
    args = parser.parse_args()
    if "identity" in args.parts:
        with tempfile.TemporaryDirectory(prefix="bench_identity_") as tmp:
            rows = identity_costs(Path(tmp), args.shards, args.init_mib)
        print_table(("stage", "before: s per rank, every link", "after: s on rank 0, first link",
                     "after: s on rank 0, next links"), rows)
        print(f"(load average {os.getloadavg()[0]:.1f})\n", flush=True)
    if "preempt" not in args.parts:
        return
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip
    model = build_model({"preset": args.preset, "caption_channels": CAPTION_DIM}, (args.frames, 2 * args.tokens, 2 * args.tokens))
    params, caption_len = sum(p.numel() for p in model.parameters()), model.model_max_length
    del model
    print(f"{args.preset}: {params / 1e6:.1f}M parameters (model + EMA + AdamW moments {16 * params / 2**20:,.0f} MiB), "
          f"{args.frames * args.tokens**2} tokens, global batch 2, 2 ranks, log_every {args.log_every}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_preempt_") as tmp:
        tmp = Path(tmp)
        worktree = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(worktree), base], cwd=REPO, check=True)
        try:
            for engine in args.engines:
                for variant, src in (("before", worktree / "src"), ("after", REPO / "src")):
                    root = tmp / f"{engine}_{variant}"
                    index = latent_index(src, root / "cache", args.frames, args.tokens, caption_len)
                    results[engine, variant] = r = measure(src, index, root, engine, args.preset, args.log_every,
                                                           deadline=variant == "after")
                    print(f"  {engine} {variant}: {json.dumps(r)}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, check=True)
    flag_s = flag_cost_s()

    rows = []
    for (engine, variant), r in results.items():
        fresh, resumed = r["fresh"], r["resumed"]
        rows.append((engine, f"{variant} ({base})" if variant == "before" else variant,
                     f"{statistics.mean([fresh['step_s'], resumed['step_s']]):.1f}",
                     f"{fresh['signal_to_exit_s']:.1f}, {resumed['signal_to_exit_s']:.1f}",
                     "-" if r["write_s"] is None else f"{r['write_s']:.1f}",
                     f"{fresh['peak_mib']:,.0f}", f"{resumed['peak_mib']:,.0f}",
                     f"{resumed['peak_mib'] - fresh['peak_mib']:+,.0f}",
                     f"{fresh['rank_peak_mib']:,.0f}, {resumed['rank_peak_mib']:,.0f}"))
    print()
    print_table(("engine", "code", "step s", "signal -> exit s (fresh run, resumed run)", "checkpoint write s",
                 "peak MiB, fresh run", "peak MiB, resumed run", "resumed - fresh MiB",
                 "largest rank's peak MiB (fresh, resumed)"), rows)
    for (engine, variant), r in results.items():
        if "deadline" in r:
            d = r["deadline"]
            print(f"\n{engine} {variant}, resumed once more in a job that ends {DEADLINE_S} s after its start: exited "
                  f"{d['exited_before_end_s']:.1f} s before that end, with no signal (status {d['returncode']})")
    step_s = statistics.median(r["fresh"]["step_s"] for r in results.values())
    print(f"\nstop flag: one all-reduce of a flag between 2 gloo processes {flag_s * 1e6:.0f} us (median of 2,000), "
          f"{flag_s / step_s:.2e} of a {step_s:.2f} s step of {args.preset}")
    print(f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
