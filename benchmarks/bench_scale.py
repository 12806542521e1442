"""Benchmark spectra's executors: local workers against Ray actors on the CPU, and one GPU against every GPU.

    python benchmarks/bench_scale.py --size 1b                 # CPU: local, 2 workers  vs  Ray, 2 CPU actors
    python benchmarks/bench_scale.py --size 7b --gpu           # GPUs: cuda:0 alone vs every visible GPU (+ Ray)

Data: bench_rank.py's Llama-shaped bf16 pair (generated once per size under --out, reused while its manifest
matches). Each contestant runs in a child process that imports spectra, times `analyze()` (the library call the
CLI makes) and saves the analysis; the parent compares every contestant's ranks and singular values with the
first one's and prints one table (markdown). Results also go to DATA/SIZE/runs/scale-*.json.

CPU contestants (--threads T, default 2 = the workers / actors):
- local: Options(device="cpu", threads=T): one reader thread, T single-threaded LAPACK workers.
- ray:   Options(executor="ray", device="cpu", threads=1) on a local Ray started in the child with T CPUs
         (ray.init(num_cpus=T)): T actors of one CPU each. Its start-up (ray.init) is timed apart, and the run is
         made twice: the first pays for the actors' start (a fresh Python importing torch and spectra per actor),
         the second too (actors are per run), so the pair shows how steady the overhead is.
  overhead per job = (ray run − local run) / jobs. Every child runs in a session of its own (see run_contestant).
  The Ray child also times the engine's stream alone: seconds to the first result (the actors' start-up) and to
  the last. `--size tiny` (254 matrices of at most 256×64, compute negligible) shows the executors' own costs.

GPU contestants (--gpu; needs CUDA): gpu:1 = Options(devices=("cuda:0",)), gpu:all = Options() (every visible
GPU, one worker each), ray:gpu = Options(executor="ray") on a local Ray (one actor per GPU). With a single GPU only
gpu:1 runs; then also record `python benchmarks/bench_rank.py --size 7b --only fast,naive --profile` (the read /
diff / Gram / eigensolve split).

--estimate prints a paper estimate instead (nothing runs): bytes read, Gram FLOPs, eigensolves and time per GPU
count for Llama-2-7B, Llama-3-70B and Llama-3.1-405B shaped pairs, under the rates stated next to MODELS below.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_rank  # the data generator and the machine description

# "tiny": 254 matrices of 64×64 to 256×64, whose compute is negligible: the executors' own cost per job shows
SIZES = {**bench_rank.SIZES, "tiny": bench_rank.LlamaShape(64, 176, 36, 256, 4, 4, 2**30)}
CPU_CONTESTANTS = ("local", "ray")
GPU_CONTESTANTS = ("gpu:1", "gpu:all", "ray:gpu")


def run_child(args: argparse.Namespace) -> int:
    """One contestant, in this (child) process: time analyze(), save the analysis, write the timings."""
    if args.child == "generate":
        where = Path(args.out) / args.size
        bench_rank.generate_pair(SIZES[args.size], where, args.seed)
        (where / "runs").mkdir(exist_ok=True)
        (where / "runs" / "machine.json").write_text(json.dumps(bench_rank.machine()))
        return 0
    from spectra import Options, analyze, save_analysis

    timings: dict[str, Any] = {}
    name, threads = args.child, args.threads
    if name == "local":
        options = Options(device="cpu", threads=threads)
    elif name == "gpu:1":
        options = Options(device="cuda", devices=("cuda:0",))
    elif name == "gpu:all":
        options = Options(device="cuda")
    else:  # ray, ray:gpu
        import ray

        started = time.perf_counter()
        if name == "ray":
            ray.init(num_cpus=threads, num_gpus=0, include_dashboard=False, logging_level="WARNING")
        else:
            ray.init(include_dashboard=False, logging_level="WARNING")
        timings["ray_init_s"] = round(time.perf_counter() - started, 2)
        cpu = name == "ray"
        options = Options(executor="ray", device="cpu" if cpu else "cuda", threads=1 if cpu else None)
    runs = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        analysis = analyze(args.base, args.tuned, options)
        runs.append(round(time.perf_counter() - started, 2))
    unchanged = sum(s.reason == "unchanged" for s in analysis.skipped)  # jobs whose ΔW was 0
    timings.update(runs_s=runs, device=analysis.device, n_jobs=len(analysis.layers) + unchanged)
    if options.executor == "ray":
        timings["first_result_s"], timings["stream_s"] = first_result(args.base, args.tuned, options)
    save_analysis(analysis, args.analysis_out)
    Path(args.timings_out).write_text(json.dumps(timings))
    return 0


def first_result(base: str, tuned: str, options: Any) -> tuple[float, float]:
    """(seconds to the first result, seconds to the last) of the engine's stream on the Ray executor: the first
    pays for the actors' start-up, the rest is the steady cost."""
    from spectra.engine import Values, run
    from spectra.io.checkpoint import open_checkpoint
    from spectra.pipeline import make_executor
    from spectra.plan.dense import plan_pair

    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        jobs = plan_pair(b, t, options).jobs
    started = time.perf_counter()
    stream = run(jobs, Values(options.precision), make_executor(options))
    next(stream)
    first = time.perf_counter() - started
    for _ in stream:
        pass
    return round(first, 2), round(time.perf_counter() - started, 2)


def run_contestant(name: str, base: Path, tuned: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tag = name.replace(":", "-")
    analysis_out, timings_out = work / f"scale-{tag}.analysis.json", work / f"scale-{tag}.timings.json"
    command = [sys.executable, __file__, "--child", name, "--base", str(base), "--tuned", str(tuned)]
    command += ["--threads", str(args.threads), "--repeat", str(args.repeat)]
    command += ["--analysis-out", str(analysis_out), "--timings-out", str(timings_out)]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    # a session of its own: with the kernel's autogroup scheduling (sched_autogroup_enabled) CPU time is shared
    # per session, and Ray's actors run in the session of its raylet daemon, not in ours
    subprocess.run(command, check=True, start_new_session=True)
    wall = time.perf_counter() - started
    result: dict[str, Any] = json.loads(timings_out.read_text())
    result.update(name=name, child_wall_s=round(wall, 2), load=(round(load_before, 2), round(os.getloadavg()[0], 2)))
    layers = json.loads(analysis_out.read_text())["layers"]
    result["ranks"] = {la["name"]: la["rank"] for la in layers}
    result["sigma"] = {la["name"]: la["singular_values"] for la in layers}
    return result


def compare(result: dict[str, Any], reference: dict[str, Any]) -> tuple[str, float]:
    """(ranks agreeing n/N, max |σ − σ_ref| / σ₁ over all matrices) against the reference contestant."""
    names = reference["ranks"]
    agree = sum(result["ranks"].get(n) == r for n, r in names.items())
    worst = 0.0
    for n, ref in reference["sigma"].items():
        got = result["sigma"].get(n, [])
        if len(got) != len(ref) or not ref:
            return f"{agree}/{len(names)}", float("inf")
        worst = max(worst, max(abs(a - b) for a, b in zip(got, ref, strict=True)) / max(ref[0], 1e-300))
    return f"{agree}/{len(names)}", worst


def table(results: list[dict[str, Any]]) -> list[str]:
    reference = results[0]
    base_run = min(reference["runs_s"])
    lines = [
        "| contestant | device | ray.init s | analyze s (each run) | first result s / stream s | child wall s "
        "| overhead per job ms | rank@90 agree | max \\|Δσ\\|/σ₁ | load before/after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        agree, err = compare(r, reference)
        overhead = (min(r["runs_s"]) - base_run) / r["n_jobs"] * 1e3
        runs = " / ".join(f"{x:.1f}" for x in r["runs_s"])
        init = f"{r['ray_init_s']:.1f}" if "ray_init_s" in r else "-"
        stream = f"{r['first_result_s']:.1f} / {r['stream_s']:.1f}" if "stream_s" in r else "-"
        lines.append(
            f"| {r['name']} | {r['device']} | {init} | {runs} | {stream} | {r['child_wall_s']:.1f} | "
            f"{'-' if r is reference else f'{overhead:+.0f}'} | {agree} | {err:.1e} | {r['load'][0]} / {r['load'][1]} |"
        )
    return lines


# ---------------------------------------------------------------------------------------------------- estimate

# name: (hidden, intermediate, layers, vocab, kv_dim); public configs of Llama-2-7B, Llama-3-70B, Llama-3.1-405B
MODELS = {
    "7B (Llama-2-7B)": (4096, 11008, 32, 32000, 4096),
    "70B (Llama-3-70B)": (8192, 28672, 80, 128256, 1024),
    "405B (Llama-3.1-405B)": (16384, 53248, 126, 128256, 1024),
}
GPU_COUNTS = {"7B (Llama-2-7B)": (1, 2, 8), "70B (Llama-3-70B)": (1, 8, 32), "405B (Llama-3.1-405B)": (8, 32, 128)}
GEMM_FLOPS = 40e12  # sustained full-fp32 (TF32 off) matmul per GPU: H100/H200 SXM peak 67 TFLOP/s
EIG_FLOPS = 0.5e12  # effective rate of eigvalsh on (4/3)k³ (tridiagonalisation, half memory-bound BLAS-2)
READ_PER_WORKER = 2e9  # checkpoint bytes/s one worker's reader reads and diffs (read, upcast, subtract)
READ_PER_NODE = 8e9  # storage bytes/s per node of 8 GPUs
READ_SHARED = 20e9  # aggregate bytes/s of the shared filesystem every node reads from


def matrices(hidden: int, inter: int, layers: int, vocab: int, kv: int) -> list[tuple[int, int, int]]:
    """(count, rows, cols) of the 2-D weights of a Llama decoder: attention, MLP, embeddings and head."""
    per_layer = [(2, hidden, hidden), (2, kv, hidden), (2, inter, hidden), (1, hidden, inter)]
    return [(c * layers, m, n) for c, m, n in per_layer] + [(2, vocab, hidden)]


def estimate() -> list[str]:
    """A paper estimate (nothing is run) of bytes read, FLOPs and time per GPU count for 7B/70B/405B pairs."""
    lines = [
        "| pair | matrices | bytes read (both, bf16) | Gram FLOPs | eigvalsh (k: count × s) | GPUs | read s "
        "| compute s | largest job s | estimate |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, shape in MODELS.items():
        mats = matrices(*shape)
        params = sum(c * m * n for c, m, n in mats)
        nbytes = 2 * 2 * params  # two checkpoints, 2 bytes per bf16 weight (1-D norms are negligible)
        gram = sum(c * 2 * min(m, n) ** 2 * max(m, n) for c, m, n in mats)
        eig: dict[int, int] = {}
        for c, m, n in mats:
            eig[min(m, n)] = eig.get(min(m, n), 0) + c
        eig_s = {k: 4 / 3 * k**3 / EIG_FLOPS for k in eig}
        compute = gram / GEMM_FLOPS + sum(c * eig_s[k] for k, c in eig.items())
        largest = max(2 * min(m, n) ** 2 * max(m, n) / GEMM_FLOPS + eig_s[min(m, n)] for _, m, n in mats)
        eig_text = ", ".join(f"{k}: {c} × {eig_s[k]:.2g} s" for k, c in sorted(eig.items()))
        for gpus in GPU_COUNTS[name]:
            nodes = -(-gpus // 8)
            bandwidth = min(READ_PER_WORKER * gpus, READ_PER_NODE * nodes, READ_SHARED)
            read = nbytes / bandwidth
            total = max(read, compute / gpus, largest)
            lines.append(
                f"| {name} | {sum(c for c, _, _ in mats)} | {nbytes / 1e9:.0f} GB | {gram:.2e} | {eig_text} | {gpus} "
                f"| {read:.0f} | {compute / gpus:.0f} | {largest:.1f} | {_duration(total)} |"
            )
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    if args.estimate:
        print("\n".join(estimate()))
        return 0
    cfg = SIZES[args.size]
    where = Path(args.out) / args.size
    work = where / "runs"
    print(f"data: {where} ({args.size}: hidden {cfg.hidden}, {cfg.layers} layers)", file=sys.stderr)
    base, tuned = where / "base", where / "tuned"
    generate = [sys.executable, __file__, "--child", "generate", "--size", args.size, "--out", args.out]
    subprocess.run([*generate, "--seed", str(args.seed)], check=True)
    info = json.loads((work / "machine.json").read_text())
    info["warm_read_s"] = round(bench_rank.warm_cache(base, tuned), 2)
    names = args.only or (GPU_CONTESTANTS if args.gpu else CPU_CONTESTANTS)
    results = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr)
        results.append(run_contestant(name, base, tuned, args, work))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (work / f"scale-{stamp}.json").write_text(
        json.dumps({"machine": info, "args": vars(args), "results": results}, indent=1)
    )
    print(f"\n{args.size}: {len(results[0]['ranks'])} matrices, threads {args.threads}, {info['date']}, {info['cpu']}")
    print("\n".join(table(results)))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="1b", help="model shape (default 1b; tiny: overhead)")
    p.add_argument("--out", default="bench-data", help="folder for the generated checkpoints (default ./bench-data)")
    p.add_argument("--gpu", action="store_true", help="GPU contestants: cuda:0 alone, every GPU, Ray on GPUs")
    p.add_argument("--estimate", action="store_true", help="print the paper estimate for 7B/70B/405B pairs and exit")
    p.add_argument("--only", type=lambda s: tuple(s.split(",")), help="contestants, comma-separated")
    p.add_argument("--threads", type=int, default=2, help="CPU workers locally, CPU actors on Ray (default 2)")
    p.add_argument("--repeat", type=int, default=2, help="analyze() runs per contestant (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--tuned", help=argparse.SUPPRESS)
    p.add_argument("--analysis-out", help=argparse.SUPPRESS)
    p.add_argument("--timings-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
