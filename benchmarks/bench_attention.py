"""STDiT vs full attention: training step time on CPU, and the CPU MFU of an STDiT step (issue 5).

    .venv/bin/python benchmarks/bench_attention.py [--quick] [--frames 4 8 16 32] [--batch 1]
                                                   [--depth 4] [--repeats 5] [--threads 1]
                                                   [--mfu-frames 16] [--no-mfu]

Model: preset STDiT-S/2 (hidden 384, 6 heads, patch 1x2x2, mlp 4x) with depth 4 (--depth),
384-d captions of 32 tokens, latents [B, 4, T, 16, 16] -> 64 tokens per frame. Both variants
are the same code (`attention: spatial_temporal` or `full`) at the same width.

One training step = forward + IDDPM hybrid loss (soraflow.models.diffusion.IDDPM(1000).training_losses:
eps MSE + VLB on the learned variance, as the Trainer) + backward + AdamW step (torch's default
AdamW, as the Trainer builds it; no EMA or grad clipping). Inputs are fixed, timesteps seeded.

Timing: the variants are interleaved (A B, then B A, ...) after a warm-up step each, and the
medians of --repeats steps are reported, as wall time and as this process's CPU time
(time.process_time, which excludes the time other processes hold the core). The load
average is printed at the start and end.

FLOPs are counted analytically (a multiply-add = 2 FLOPs; a training step = 3x the forward,
the usual model-FLOP convention: no flash-attention recompute, no optimizer arithmetic). The
linear/conv part is cross-checked against torch.utils.flop_counter.FlopCounterMode over a
real fwd+bwd; FlopCounterMode has no formula for the CPU SDPA kernel
(aten._scaled_dot_product_flash_attention_for_cpu), so attention is counted analytically only.

  attention-FLOP ratio   full attention's score/value FLOPs over STDiT's:
                         (T*S)^2 / (T*S^2 + S*T^2) = T*S / (T + S)
  step-FLOP ratio        whole model (linear layers, self/temporal/cross attention, embedders)
                         full over STDiT. STDiT's temporal attention has its own qkv and proj
                         (+4*D^2 per token per block over full's 14*D^2), so the linear work is
                         NOT equal: STDiT does more of it, and at small T it is analytically slower.
  achieved               measured speedup / step-FLOP ratio: the fair bound, since equal FLOP/s
                         for both would give exactly that ratio (goal >= 60%). Against the
                         attention-only ratio it is shown too, but that bound ignores the ~90%
                         of FLOPs that no attention pattern removes.

A second table times the attention kernels alone (SDPA fwd+bwd at one block's shapes: full over
T*S tokens vs spatial over S plus temporal over T) against the attention-FLOP ratio.

MFU = achieved model FLOP/s over a measured peak: the median of several 2048^3 fp32 torch.matmul
runs on the same thread count, taken between the steps. Variants tried for cheap wins: fused
AdamW, batch 2, the SDPA math backend instead of the fused flash CPU kernel, 2 threads (3 steps
only: it can be 5-10x slower on a busy machine).
A torch.profiler breakdown of the baseline step is printed.

On a shared 2-core machine, 2 torch threads can be much slower than 1 (OpenMP workers wait on
each other while other processes hold the cores); 1 thread is the default.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from soraflow.models.diffusion import IDDPM
from soraflow.models.stdit import PRESET_DEFAULTS, PRESETS, build_model

PRESET = "STDiT-S/2"
GRID = (16, 16)  # latent H, W
CAPTION_LEN, CAPTION_DIM = 32, 384
PEAK_N = 2048


def loadavg() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


# --------------------------------------------------------------------------------------
# Analytic FLOPs (forward; multiply-add = 2)
# --------------------------------------------------------------------------------------


def forward_flops(cfg: dict, batch: int, frames: int) -> dict[str, float]:
    """Forward FLOPs of build_model(cfg) on [batch, C, frames, 16, 16], by part."""
    c = {**PRESET_DEFAULTS, **PRESETS[cfg["preset"]], **cfg}
    D, depth, L = c["hidden_size"], c["depth"], c["model_max_length"]
    Dm, Ccap, C = int(D * c["mlp_ratio"]), c["caption_channels"], c["in_channels"]
    pt, ph, pw = c["patch_size"]
    T, S = frames // pt, (GRID[0] // ph) * (GRID[1] // pw)
    N, B = T * S, batch
    st = c.get("attention", "spatial_temporal") == "spatial_temporal"
    per_token = (4 + (4 if st else 0) + 2) * D * D + 2 * D * Dm  # attn (+temporal) qkv/proj, cross q/proj, MLP
    linear = 2 * B * (
        depth * (N * per_token + L * 2 * D * D)  # blocks (+ cross-attn kv on the text tokens)
        + N * pt * ph * pw * C * D  # patch embed (Conv3d)
        + 256 * D + D * D + D * 6 * D  # t_embedder, t_block
        + L * (Ccap * D + D * D)  # caption embedder
        + N * D * pt * ph * pw * 2 * C  # final layer
    )
    # scores (q k^T) and values (p v): 2 matmuls of n*n*D multiply-adds per sequence of n
    self_attn = 2 * 2 * B * depth * D * ((T * S * S + S * T * T) if st else N * N)
    cross_attn = 2 * 2 * B * depth * D * N * L
    patch_embed = 2 * B * N * pt * ph * pw * C * D
    return dict(linear=linear, self_attn=self_attn, cross_attn=cross_attn, patch_embed=patch_embed,
                total=linear + self_attn + cross_attn)


def attention_ratio(frames: int, tokens_per_frame: int) -> float:
    T, S = frames, tokens_per_frame
    return (T * S) ** 2 / (T * S * S + S * T * T)


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------


class Case:
    """One model + optimizer + fixed batch; step() runs a timed training step."""

    def __init__(self, cfg: dict, batch: int, frames: int, threads: int = 1, fused_adamw: bool = False,
                 sdpa: str = "default"):
        torch.manual_seed(0)
        self.model = build_model(cfg, (frames, *GRID)).train()
        kwargs = dict(fused=True) if fused_adamw else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, **kwargs)
        self.diffusion = IDDPM(1000)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 4, frames, *GRID, generator=g)
        self.kwargs = dict(y=torch.randn(batch, CAPTION_LEN, CAPTION_DIM, generator=g),
                           mask=torch.ones(batch, CAPTION_LEN, dtype=torch.bool))
        self.timesteps = torch.Generator().manual_seed(2)
        self.batch, self.threads, self.sdpa = batch, threads, sdpa
        self.max_records = 10**9  # interleave() stops stepping this case after that many
        self.flops = forward_flops(cfg, batch, frames)
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def _step(self) -> None:
        t = torch.randint(0, 1000, (self.batch,), generator=self.timesteps)
        backend = sdpa_kernel(SDPBackend.MATH) if self.sdpa == "math" else contextlib.nullcontext()
        with backend:
            loss = self.diffusion.training_losses(self.model, self.x, t, self.kwargs)["loss"].mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()

    def step(self, record: bool = True) -> None:
        torch.set_num_threads(self.threads)
        wall, cpu = time.perf_counter(), time.process_time()
        self._step()
        if record:
            self.wall.append(time.perf_counter() - wall)
            self.cpu.append(time.process_time() - cpu)

    def counted_step(self) -> float:
        """A warm-up step under FlopCounterMode: the FLOPs it sees (mm/addmm/conv, fwd+bwd)."""
        torch.set_num_threads(self.threads)
        counter = FlopCounterMode(display=False)
        with counter:
            self._step()
        return counter.get_total_flops()

    @property
    def step_flops(self) -> float:
        return 3 * self.flops["total"]

    def median(self, kind: str = "wall") -> float:
        return statistics.median(self.wall if kind == "wall" else self.cpu)


def interleave(cases: list[Case], repeats: int) -> None:
    """A B C..., then ...C B A, and so on: drift in the machine's load hits all cases alike."""
    for r in range(repeats):
        for case in (cases if r % 2 == 0 else cases[::-1]):
            if len(case.wall) < case.max_records:
                case.step()


class Peak:
    """fp32 matmul FLOP/s on a given thread count, sampled several times during the run."""

    def __init__(self):
        self.a, self.b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
        self.out = torch.empty(PEAK_N, PEAK_N)
        self.samples: dict[int, tuple[list[float], list[float]]] = {}

    def sample(self, threads: int, runs: int = 3) -> None:
        torch.set_num_threads(threads)
        torch.matmul(self.a, self.b, out=self.out)  # warm
        walls, cpus = self.samples.setdefault(threads, ([], []))
        flops = 2 * PEAK_N**3
        for _ in range(runs):
            wall, cpu = time.perf_counter(), time.process_time()
            torch.matmul(self.a, self.b, out=self.out)
            walls.append(flops / (time.perf_counter() - wall))
            cpus.append(flops / (time.process_time() - cpu))

    def median(self, threads: int, kind: str = "wall") -> float:
        walls, cpus = self.samples[threads]
        return statistics.median(walls if kind == "wall" else cpus)


# --------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------


class AttentionCores:
    """SDPA forward + backward alone at one block's shapes: full over [B, H, T*S, Dh] vs STDiT's
    spatial [B*T, H, S, Dh] plus temporal [B*S, H, T, Dh] (no projections, no layout copies)."""

    def __init__(self, batch: int, frames: int, tokens_per_frame: int, heads: int = 6, head_dim: int = 64,
                 threads: int = 1):
        B, T, S = batch, frames, tokens_per_frame
        g = torch.Generator().manual_seed(3)

        def qkv(n: int, length: int):
            return [torch.randn(n, heads, length, head_dim, generator=g).requires_grad_() for _ in range(3)]

        self.shapes = {"full": [qkv(B, T * S)], "spatial_temporal": [qkv(B * T, S), qkv(B * S, T)]}
        self.times: dict[str, list[float]] = {"full": [], "spatial_temporal": []}
        self.threads = threads

    def run(self, kind: str, record: bool = True) -> None:
        torch.set_num_threads(self.threads)
        start = time.process_time()
        for q, k, v in self.shapes[kind]:
            out = F.scaled_dot_product_attention(q, k, v)
            out.backward(torch.ones_like(out))
        if record:
            self.times[kind].append(time.process_time() - start)

    def median(self, kind: str) -> float:
        return statistics.median(self.times[kind])


def model_cfg(args, attention: str) -> dict:
    return dict(preset=PRESET, depth=args.depth, caption_channels=CAPTION_DIM, model_max_length=CAPTION_LEN,
                attention=attention)


def bench_speedup(args, peak: Peak) -> list[Case]:
    S = (GRID[0] // 2) * (GRID[1] // 2)
    pairs = {T: (Case(model_cfg(args, "spatial_temporal"), args.batch, T, args.threads),
                 Case(model_cfg(args, "full"), args.batch, T, args.threads)) for T in args.frames}
    print(f"\n## 1. Training step: STDiT (spatial_temporal) vs full attention, {PRESET} depth {args.depth}, "
          f"batch {args.batch}, {args.threads} thread(s), {args.repeats} interleaved repeats", flush=True)
    print("\nFlopCounterMode (mm/addmm/conv, fwd+bwd) vs analytic linear x3:")
    for T, (st, full) in pairs.items():
        for name, case in (("spatial_temporal", st), ("full", full)):
            counted = case.counted_step()
            print(f"  T={T:2d} {name:16s} counted {counted / 1e9:7.2f} GFLOP, analytic linear x3 "
                  f"{3 * case.flops['linear'] / 1e9:7.2f} (+ attention {3 * (case.flops['total'] - case.flops['linear']) / 1e9:6.2f}"
                  f" not seen by the counter)", flush=True)
    peak.sample(args.threads)
    interleave([c for pair in pairs.values() for c in pair], args.repeats)
    peak.sample(args.threads)

    print(f"\nload average after part 1: {loadavg()}")
    print("\n| T  | tokens | STDiT s | full s | speedup wall | speedup cpu | attn-FLOP ratio | step-FLOP ratio "
          "| achieved of step, wall / cpu | achieved of attn | attn share of full's FLOPs |")
    print("|---:|-------:|--------:|-------:|-------------:|------------:|----------------:|----------------:"
          "|-----------------------------:|-----------------:|---------------------------:|")
    for T, (st, full) in pairs.items():
        speed_wall = full.median("wall") / st.median("wall")
        speed_cpu = full.median("cpu") / st.median("cpu")
        attn = attention_ratio(T, S)
        step = full.flops["total"] / st.flops["total"]
        share = full.flops["self_attn"] / full.flops["total"]
        print(f"| {T:2d} | {T * S:6d} | {st.median():7.3f} | {full.median():6.3f} | {speed_wall:11.2f}x | "
              f"{speed_cpu:10.2f}x | {attn:14.1f}x | {step:14.2f}x | {speed_wall / step:16.0%} / {speed_cpu / step:4.0%} | "
              f"{speed_wall / attn:16.0%} | {share:26.0%} |")
    print("\n(speedup = full step time / STDiT step time, medians of wall or CPU time; achieved = speedup / analytic"
          " ratio; STDiT s / full s are wall medians)")

    cores = {T: AttentionCores(args.batch, T, S, threads=args.threads) for T in args.frames}
    for c in cores.values():
        c.run("full", record=False), c.run("spatial_temporal", record=False)
    for r in range(args.repeats):
        for c in cores.values():
            for kind in (("full", "spatial_temporal") if r % 2 == 0 else ("spatial_temporal", "full")):
                c.run(kind)
    print("\nAttention cores alone (SDPA fwd+bwd, one block, 6 heads x 64; CPU-time medians): how much of the"
          " attention-FLOP ratio the attention kernels themselves realise")
    print("\n| T  | full ms | STDiT spatial+temporal ms | speedup | attn-FLOP ratio | achieved |")
    print("|---:|--------:|--------------------------:|--------:|----------------:|---------:|")
    for T, c in cores.items():
        full, st = c.median("full"), c.median("spatial_temporal")
        attn = attention_ratio(T, S)
        print(f"| {T:2d} | {1e3 * full:7.1f} | {1e3 * st:25.1f} | {full / st:6.1f}x | {attn:14.1f}x | "
              f"{full / st / attn:7.0%} |")
    return [pair[0] for pair in pairs.values()]


def mfu_row(name: str, case: Case, peak: Peak) -> str:
    gf_wall = case.step_flops / case.median("wall")
    gf_cpu = case.step_flops / case.median("cpu")
    mfu_wall = gf_wall / peak.median(case.threads, "wall")
    mfu_cpu = gf_cpu / peak.median(case.threads, "cpu")
    return (f"| {name:28s} | {case.threads} | {case.batch} | {case.median('wall'):6.3f} | {case.median('cpu'):6.3f} | "
            f"{case.step_flops / 1e9:6.1f} | {gf_wall / 1e9:6.1f} | {mfu_wall:5.0%} | {gf_cpu / 1e9:6.1f} | {mfu_cpu:5.0%} |")


def profile_breakdown(case: Case) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(case.threads)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            case._step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = {"GEMM (mm/addmm/bmm)": 0.0, "attention kernels (SDPA)": 0.0, "optimizer step (AdamW, total)": 0.0,
              "copies (copy_/contiguous)": 0.0}
    for e in events:
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            groups["GEMM (mm/addmm/bmm)"] += e.self_cpu_time_total
        elif "scaled_dot_product" in e.key:
            groups["attention kernels (SDPA)"] += e.self_cpu_time_total
        elif e.key.startswith("Optimizer.step"):
            groups["optimizer step (AdamW, total)"] += e.cpu_time_total
        elif e.key == "aten::copy_":
            groups["copies (copy_/contiguous)"] += e.self_cpu_time_total
    # optimizer ops' self time sits inside the total above; copies inside it are few (foreach-free AdamW)
    groups["other (elementwise, norms, GELU, autograd)"] = total - sum(groups.values())
    print(f"\ntorch.profiler, baseline step (2 steps, {total / 2e3:.0f} ms/step of op time):")
    for name, us in groups.items():
        print(f"  {name:45s} {us / 2e3:7.1f} ms/step  {us / total:5.1%}")
    gemm_s = groups["GEMM (mm/addmm/bmm)"] / 2e6  # per step
    attn_s = max(groups["attention kernels (SDPA)"] / 2e6, 1e-9)
    attn_flops = 3 * (case.flops["self_attn"] + case.flops["cross_attn"])
    print(f"  op rates (op wall time, under load): GEMM {3 * case.flops['linear'] / gemm_s / 1e9:.1f} GFLOP/s, "
          f"attention {attn_flops / attn_s / 1e9:.1f} GFLOP/s (analytic FLOPs x3 over the ops' time)")
    print("\n  top ops by self CPU time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"    {e.key[:60]:60s} {e.self_cpu_time_total / 2e3:7.1f} ms/step  ({e.count // 2} calls)")


def bench_mfu(args, peak: Peak, baseline_st: Case | None) -> None:
    T = args.mfu_frames
    cfg = model_cfg(args, "spatial_temporal")
    variants = {
        "baseline (AdamW for-loop)": Case(cfg, args.batch, T, args.threads),
        "fused AdamW": Case(cfg, args.batch, T, args.threads, fused_adamw=True),
        "batch x2": Case(cfg, 2 * args.batch, T, args.threads),
        "SDPA math backend": Case(cfg, args.batch, T, args.threads, sdpa="math"),
    }
    if (os.cpu_count() or 1) >= 2 and args.threads == 1:
        variants["2 threads"] = Case(cfg, args.batch, T, threads=2)
        variants["2 threads"].max_records = 3  # can be 5-10x slower on a busy machine; keep the run short
    print(f"\n## 2. CPU MFU of an STDiT step: {PRESET} depth {args.depth}, hidden 384, T={T} "
          f"({T * 64} tokens), {args.repeats} interleaved repeats", flush=True)
    for case in variants.values():
        case.step(record=False)
    thread_counts = sorted({c.threads for c in variants.values()})
    for th in thread_counts:
        peak.sample(th)
    interleave(list(variants.values()), args.repeats)
    for th in thread_counts:
        peak.sample(th)
    print(f"\nload average after part 2: {loadavg()}")
    print("\nmatmul peak (fp32 %d^3 torch.matmul, median of %s samples spread over the run):"
          % (PEAK_N, {th: len(peak.samples[th][0]) for th in thread_counts}))
    for th in thread_counts:
        print(f"  {th} thread(s): {peak.median(th, 'wall') / 1e9:6.1f} GFLOP/s wall, "
              f"{peak.median(th, 'cpu') / 1e9:6.1f} GFLOP/s per CPU-second")
    print("\n| variant                      | threads | batch | wall s | cpu s | GFLOP/step | GFLOP/s wall | MFU wall "
          "| GFLOP/s cpu | MFU cpu |")
    print("|------------------------------|--:|--:|-------:|------:|------:|------:|-----:|------:|-----:|")
    for name, case in variants.items():
        print(mfu_row(name, case, peak))
    if baseline_st is not None:
        print(mfu_row(f"part-1 STDiT T={T} (same cfg)", baseline_st, peak))
    base = variants["baseline (AdamW for-loop)"]
    print("\n(model FLOPs = 3 x analytic forward; MFU cpu = FLOP per CPU-second of this process over the matmul's,"
          " i.e. robust to other processes taking the cores; channels-last is moot: the only conv, the patch embed,"
          f" is {base.flops['patch_embed'] / base.flops['total']:.2%} of the FLOPs)")
    profile_breakdown(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of --repeats")
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steady figures on a shared machine)")
    parser.add_argument("--mfu-frames", type=int, default=16)
    parser.add_argument("--no-mfu", action="store_true", help="skip part 2")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} CPUs, load average at start: {loadavg()}")
    peak = Peak()
    peak.sample(args.threads)
    st_cases = bench_speedup(args, peak)
    if not args.no_mfu:
        same = [c for c, T in zip(st_cases, args.frames) if T == args.mfu_frames]
        bench_mfu(args, peak, same[0] if same else None)
    print(f"\nload average at end: {loadavg()}; wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
