"""Benchmark `spectra rank` against the alternatives a user has, end to end, each in its own process.

    python benchmarks/bench_rank.py                       # ≈250M Llama-shaped bf16 pair, all four contestants
    python benchmarks/bench_rank.py --size 1b --only fast,exact --threads 2 --profile

1. Generates (once; reused while the manifest matches) a Llama-shaped base/tuned pair in bf16, sharded with a
   Hugging Face index, streaming one tensor at a time: W_base ~ N(0, 0.02²) and, for every 2-D weight,
   ΔW = U diag(σ) Vᵀ with a power-law σ_i ∝ i^-α on the top quarter of the directions (α per module kind)
   plus Gaussian noise holding 5% of ‖ΔW‖_F², scaled to ‖ΔW‖_F / ‖W_base‖_F ≈ 1e-2 (well above bf16 rounding).
2. Reads every file once so that all contestants start from the page cache.
3. Runs each contestant as a separate child process and takes its wall time and peak RSS from os.wait4 (that
   child alone):
   - fast:  `spectra rank BASE TUNED --json ... --precision fast` (the CLI, as a user runs it)
   - exact: the same with `--precision exact` (float64 SVD)
   - naive: safetensors.torch.load_file of both checkpoints, then torch.linalg.svdvals(t.float() - b.float())
            per 2-D weight, float32 (what a user would write)
   - scipy: scipy.linalg.svdvals (LAPACK gesdd) on the float64 ΔW, one tensor pair at a time: the reference
4. Every child writes its rank@τ (τ = 0.9) and singular values per matrix; the parent compares them with the
   float64 reference and prints: contestant, wall s, ratio to spectra fast, peak RSS MiB, ranks agreeing (n/N),
   and the largest singular-value error max|σ − σ_ref|/σ₁ over all matrices.

`--profile` adds a serial run of the fast pipeline in a child, stage by stage with no overlap: read, diff (upcast,
subtract, norms), rounding-noise estimate, ‖ΔW‖_F², Gram product, eigensolve, float64 redo, metrics.

The parent imports only the standard library and never holds much memory: the peak RSS that wait4 reports for a
child includes the memory of the process it was started from. Results also go to DATA/SIZE/runs/results-*.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

THRESHOLD = 0.9
RANK_RTOL = 1e-6  # the same slack as spectra.metrics.energy_rank
CONTESTANTS = ("fast", "exact", "naive", "scipy")
REFERENCE = "scipy"
GENERATOR_VERSION = 1
NOISE_SHARE = 0.05  # share of ‖ΔW‖_F² that is unstructured Gaussian noise
REL_CHANGE = 1e-2  # typical ‖ΔW‖_F / ‖W_base‖_F
BASE_STD = 0.02  # Llama initialiser scale
ALPHA = {
    "q_proj": 1.0,
    "k_proj": 1.0,
    "v_proj": 0.7,
    "o_proj": 0.7,
    "gate_proj": 0.6,
    "up_proj": 0.6,
    "down_proj": 0.6,
    "embed_tokens": 0.8,
    "lm_head": 0.8,
}


@dataclass(frozen=True, slots=True)
class LlamaShape:
    """The dimensions that fix every tensor shape of a Llama-style decoder."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    shard_bytes: int  # maximum bytes per shard file

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


SIZES = {
    "250m": LlamaShape(1024, 2816, 14, 32000, 16, 16, 200 * 2**20),  # ≈ 246M parameters, 3 shards
    "1b": LlamaShape(2048, 5632, 22, 32000, 32, 4, 1 * 2**30),  # TinyLlama-1.1B shapes (grouped-query attention)
    "7b": LlamaShape(4096, 11008, 32, 32000, 32, 32, 4 * 2**30),  # Llama-2-7B shapes
}


def tensor_shapes(cfg: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama checkpoint, in Hugging Face order (norms included: 1-D, skipped by spectra)."""
    h, f = cfg.hidden, cfg.intermediate
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg.vocab, h))]
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (cfg.kv_dim, h)),
            (p + "self_attn.v_proj.weight", (cfg.kv_dim, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    return [*out, ("model.norm.weight", (h,)), ("lm_head.weight", (cfg.vocab, h))]


# ---------------------------------------------------------------------------------------------------- data


def generate_pair(cfg: LlamaShape, where: Path, seed: int) -> tuple[Path, Path]:
    """Write base/ and tuned/ (bf16 shards + index) under `where`, unless a matching manifest says they exist.

    Streaming: one tensor (both versions) is in memory at a time; shard headers are written first, from the shapes.
    """
    manifest = {
        "generator": GENERATOR_VERSION,
        "shape": asdict(cfg),
        "seed": seed,
        "noise_share": NOISE_SHARE,
        "rel_change": REL_CHANGE,
        "alpha": ALPHA,
    }
    base, tuned, done = where / "base", where / "tuned", where / "manifest.json"
    if done.is_file() and json.loads(done.read_text()) == manifest:
        return base, tuned
    done.unlink(missing_ok=True)
    import torch

    specs = tensor_shapes(cfg)
    shards = _plan_shards(specs, cfg.shard_bytes)
    started = time.perf_counter()
    for folder in (base, tuned):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.safetensors"):
            old.unlink()
    weight_map: dict[str, str] = {}
    for k, names in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        shapes = [(n, s) for n, s in specs if n in set(names)]
        header = _safetensors_header(shapes)
        with open(base / file, "wb") as fb, open(tuned / file, "wb") as ft:
            fb.write(header)
            ft.write(header)
            for name, shape in shapes:
                w, w_tuned = _tensor_pair(name, shape, seed, torch)
                fb.write(w.view(torch.int16).numpy().tobytes())
                ft.write(w_tuned.view(torch.int16).numpy().tobytes())
                weight_map[name] = file
        print(f"  wrote shard {k}/{len(shards)} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    total = sum(2 * math.prod(s) for _, s in specs)
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    for folder in (base, tuned):
        (folder / "model.safetensors.index.json").write_text(index)
    done.write_text(json.dumps(manifest))
    return base, tuned


def _plan_shards(specs: list[tuple[str, tuple[int, ...]]], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _safetensors_header(shapes: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The 8-byte length plus the JSON header of a bf16 safetensors file holding `shapes` in this order."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _tensor_pair(name: str, shape: tuple[int, ...], seed: int, torch: Any) -> tuple[Any, Any]:
    """(W_base, W_tuned) in bf16; W_tuned = bf16(W_base + ΔW), ΔW computed in float32 from a per-name seed."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    rel = REL_CHANGE * float(torch.empty(()).uniform_(0.5, 2.0, generator=gen))
    if len(shape) == 1:
        w = (1.0 + 0.1 * torch.randn(shape, generator=gen)).bfloat16()
        return w, (w.float() + rel * torch.randn(shape, generator=gen)).bfloat16()
    w = (BASE_STD * torch.randn(shape, generator=gen)).bfloat16()
    m, n = shape
    r = max(1, min(m, n) // 4)
    kind = name.split(".")[-2]
    alpha = ALPHA.get(kind, 0.7) + float(torch.empty(()).uniform_(-0.1, 0.1, generator=gen))
    sigma = torch.arange(1, r + 1, dtype=torch.float32) ** -alpha
    u = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    delta = (u * sigma) @ v.mT
    del u, v
    target = (rel * float(torch.linalg.vector_norm(w.float()))) ** 2  # ‖ΔW‖_F²
    delta *= math.sqrt((1 - NOISE_SHARE) * target) / float(torch.linalg.vector_norm(sigma))
    noise = torch.randn(m, n, generator=gen)
    delta.add_(noise, alpha=math.sqrt(NOISE_SHARE * target / (m * n)))
    del noise
    delta.add_(w.float())
    return w, delta.bfloat16()


def warm_cache(*folders: Path) -> float:
    """Read every file once (page cache); return the seconds it took."""
    started = time.perf_counter()
    for folder in folders:
        for file in sorted(folder.iterdir()):
            with open(file, "rb") as fh:
                while fh.read(8 * 2**20):
                    pass
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------- children


def energy_rank(s: Any, threshold: float = THRESHOLD) -> int:
    """Smallest k with Σ_{i≤k} σ² ≥ τ·Σσ²·(1 − 1e-6), float64; the definition of spectra.metrics.energy_rank."""
    import numpy as np

    cum = np.cumsum(np.square(np.asarray(s, dtype=np.float64)))
    if not cum.size or cum[-1] <= 0:
        return 0
    return min(int(np.searchsorted(cum, threshold * cum[-1] * (1 - RANK_RTOL))) + 1, cum.size)


def _weight_map(folder: Path) -> dict[str, str]:
    index: dict[str, str] = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return index


def naive_ranks(base: Path, tuned: Path, device: str) -> tuple[dict[str, int], dict[str, list[float]]]:
    """What a user would write: load both state dicts (every shard with load_file), float32 svdvals of each ΔW."""
    import torch
    from safetensors.torch import load_file

    dev = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    b: dict[str, Any] = {}
    t: dict[str, Any] = {}
    for state, folder in ((b, base), (t, tuned)):
        for file in sorted(set(_weight_map(folder).values())):
            state.update(load_file(str(folder / file)))
    ranks, sigma = {}, {}
    for name, w in t.items():
        if w.ndim == 2 and name in b:
            s = torch.linalg.svdvals(w.to(dev).float() - b[name].to(dev).float()).cpu().double().numpy()
            ranks[name], sigma[name] = energy_rank(s), s.tolist()
    return ranks, sigma


def scipy_ranks(base: Path, tuned: Path) -> tuple[dict[str, int], dict[str, list[float]]]:
    """The float64 reference: scipy.linalg.svdvals (LAPACK gesdd) of ΔW in float64, one tensor pair at a time."""
    import scipy.linalg
    from safetensors import safe_open

    files: dict[Path, Any] = {}

    def read(folder: Path, name: str) -> Any:
        file = folder / _weight_map(folder)[name]
        if file not in files:
            files[file] = safe_open(str(file), framework="pt")
        return files[file].get_tensor(name)

    ranks, sigma = {}, {}
    base_names = set(_weight_map(base))
    for name in _weight_map(tuned):
        w = read(tuned, name)
        if w.ndim == 2 and name in base_names:
            s = scipy.linalg.svdvals((w.double() - read(base, name).double()).numpy())
            ranks[name], sigma[name] = energy_rank(s), s.tolist()
    return ranks, sigma


def profile_split(base: Path, tuned: Path, device: str) -> dict[str, float]:
    """The fast pipeline run serially, stage by stage, with seconds per stage (no overlap; see module doc)."""
    import torch

    import spectra.plan.delta
    from spectra import Options
    from spectra.analysis.metrics import compute_metrics, module_kinds
    from spectra.engine.executor import schedule_key
    from spectra.engine.local import resolve_device
    from spectra.engine.sigma import (
        frobenius_energy,
        gram_eigenvalues,
        gram_matrix,
        gram_values,
        sigma_from_eigenvalues,
        unresolved,
    )
    from spectra.io.checkpoint import open_checkpoint
    from spectra.plan.delta import make_delta
    from spectra.plan.dense import plan_pair
    from spectra.records import Delta, Skipped, Spectrum

    options = Options(device=device)
    dev = resolve_device(device)
    split = dict.fromkeys(
        ("read", "diff", "noise estimate", "energy", "gram", "eigensolve", "f64 redo", "metrics"), 0.0
    )

    def clock(stage: str, start: float) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        split[stage] += now - start
        return now

    noise_fn = spectra.plan.delta.rounding_noise_energy

    def timed_noise(w: Any, dtype: str) -> float:
        t0 = time.perf_counter()
        try:
            return noise_fn(w, dtype)
        finally:
            split["noise estimate"] += time.perf_counter() - t0

    spectra.plan.delta.rounding_noise_energy = timed_noise  # type: ignore[assignment]
    spectra_out: list[Spectrum] = []
    started = time.perf_counter()
    with open_checkpoint(str(base)) as bc, open_checkpoint(str(tuned)) as tc:
        plan = plan_pair(bc, tc, options)
    preread = _Preread()
    for job in sorted(plan.jobs, key=schedule_key):
        t0 = time.perf_counter()
        preread.load(job.operand.tuned, job.operand.base)  # type: ignore[union-attr]  # dense jobs
        t0 = clock("read", t0)
        delta = make_delta(job, preread)  # type: ignore[arg-type]
        t0 = clock("diff", t0)
        if isinstance(delta, Skipped) or delta.values is None:
            continue
        x = delta.values.unsqueeze(0).to(dev)
        energy = frobenius_energy(x)
        t0 = clock("energy", t0)
        gram = gram_matrix(x)
        t0 = clock("gram", t0)
        lam = gram_eigenvalues(gram)
        s = sigma_from_eigenvalues(lam).cpu().numpy()
        t0 = clock("eigensolve", t0)
        method = "gram-f32"
        if unresolved(lam.double().cpu().numpy())[0]:
            s, method = gram_values(x.double()).cpu().numpy(), "gram-f64"
            t0 = clock("f64 redo", t0)
        d: Delta = delta
        spectra_out.append(
            Spectrum(d.name, d.shape, s[0], float(energy[0]), d.base_norm, d.dtype, d.noise_energy, method)
        )
    t0 = time.perf_counter()
    kinds = module_kinds([sp.name for sp in spectra_out])
    for sp in spectra_out:
        compute_metrics(sp, options, *kinds[sp.name])
    clock("metrics", t0)
    split["diff"] -= split["noise estimate"]
    split["total"] = time.perf_counter() - started
    return split


class _Preread:
    """A spectra.io.tensors.Handles stand-in serving byte ranges read from disk beforehand (`load`), so that the
    profile times the reads apart from the diff: `get(file)` returns a file-like view of the loaded range."""

    def __init__(self) -> None:
        self.ranges: dict[Path, tuple[int, memoryview]] = {}

    def load(self, *entries: Any) -> None:
        self.ranges = {}
        for entry in entries:
            with open(entry.file, "rb") as fh:
                fh.seek(entry.start)
                self.ranges[entry.file] = (entry.start, memoryview(fh.read(entry.nbytes)))

    def get(self, file: Path) -> _Range:
        return _Range(*self.ranges[file])

    def close(self) -> None:
        self.ranges = {}


class _Range:
    def __init__(self, start: int, data: memoryview) -> None:
        self.start, self.data, self.pos = start, data, start

    def seek(self, pos: int) -> None:
        self.pos = pos

    def readinto(self, buffer: memoryview) -> int:
        chunk = self.data[self.pos - self.start : self.pos - self.start + len(buffer)]
        buffer[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def run_child(args: argparse.Namespace) -> int:
    """Entry point of a child process (generate, naive, scipy, profile)."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    base, tuned, where = Path(args.base), Path(args.tuned), Path(args.out) / args.size
    if args.child == "generate":
        generate_pair(SIZES[args.size], where, args.seed)
        (where / "runs").mkdir(exist_ok=True)
        (where / "runs" / "machine.json").write_text(json.dumps(machine()))
        return 0
    out = Path(args.ranks_out)
    if args.child == "naive":
        ranks, sigma = naive_ranks(base, tuned, args.device)
        out.write_text(json.dumps({"ranks": ranks, "sigma": sigma}))
    elif args.child == "scipy":
        ranks, sigma = scipy_ranks(base, tuned)
        out.write_text(json.dumps({"ranks": ranks, "sigma": sigma}))
    elif args.child == "profile":
        out.write_text(json.dumps(profile_split(base, tuned, args.device)))
    else:
        raise SystemExit(f"unknown child {args.child!r}")
    return 0


# ---------------------------------------------------------------------------------------------------- parent


@dataclass(frozen=True, slots=True)
class Result:
    """One contestant's run."""

    name: str
    wall_s: float
    peak_rss_mib: float
    exit_code: int
    ranks: dict[str, int]
    methods: dict[str, str]  # spectra only: how each σ was computed
    sigma: dict[str, list[float]]  # singular values per matrix, descending


def run_contestant(name: str, base: Path, tuned: Path, args: argparse.Namespace, work: Path) -> Result:
    """Start the contestant as a child process; wall time and peak RSS of that child alone (os.wait4)."""
    out = work / f"{name}.json"
    out.unlink(missing_ok=True)
    if name in ("fast", "exact"):
        cmd = [
            *_spectra_command(),
            "rank",
            str(base),
            str(tuned),
            "--json",
            str(out),
            "--precision",
            name,
            "--device",
            args.device,
        ]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
    else:
        cmd = [*_child_command(name, args), "--ranks-out", str(out)]
    env = dict(os.environ)
    if args.threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(args.threads)
    with open(work / f"{name}.log", "wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    ranks: dict[str, int] = {}
    methods: dict[str, str] = {}
    sigma: dict[str, list[float]] = {}
    if code == 0 and out.is_file():
        data = json.loads(out.read_text())
        if "layers" in data:  # a spectra analysis
            ranks = {layer["name"]: int(layer["rank"]) for layer in data["layers"]}
            methods = {layer["name"]: layer["method"] for layer in data["layers"]}
            sigma = {layer["name"]: layer["singular_values"] for layer in data["layers"]}
        else:
            ranks, sigma = {k: int(v) for k, v in data["ranks"].items()}, data["sigma"]
    else:
        tail = (work / f"{name}.log").read_text(errors="replace")[-2000:]
        print(f"  {name} failed (exit {code}):\n{tail}", file=sys.stderr)
    return Result(name, wall, usage.ru_maxrss / 1024, code, ranks, methods, sigma)


def _spectra_command() -> list[str]:
    script = Path(sys.executable).with_name("spectra")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "spectra_cli"]


def agreement(result: Result, reference: Result | None) -> str:
    if reference is None or not reference.ranks:
        return "no reference"
    if not result.ranks:
        return "failed"
    same = sum(result.ranks.get(k) == v for k, v in reference.ranks.items())
    return f"{same}/{len(reference.ranks)}"


def sigma_error(result: Result, reference: Result | None) -> float | None:
    """max over matrices of max_i |σ_i − σ_ref,i| / σ_ref,1 (None without both spectra)."""
    if reference is None or result is reference or not result.sigma or not reference.sigma:
        return None
    worst = 0.0
    for name, ref in reference.sigma.items():
        got = result.sigma.get(name)
        if got is None or len(got) != len(ref) or not ref[0]:
            return math.inf
        worst = max(worst, max(abs(a - b) for a, b in zip(got, ref, strict=True)) / ref[0])
    return worst


def table(results: list[Result], reference: Result | None) -> list[str]:
    fast = next((r for r in results if r.name == "fast" and r.exit_code == 0), None)
    label = {
        "fast": "spectra fast",
        "exact": "spectra exact",
        "naive": "naive torch svdvals f32",
        "scipy": "scipy gesdd f64 (reference)",
    }
    rows = [
        "| contestant | wall s | × spectra fast | peak RSS MiB | rank@90 agree | max \\|Δσ\\|/σ₁ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r.wall_s / fast.wall_s:.2f}" if fast is not None else "-"
        err = sigma_error(r, reference)
        rows.append(
            f"| {label[r.name]} | {r.wall_s:.1f} | {ratio} | {r.peak_rss_mib:.0f} | "
            f"{agreement(r, reference)} | {'-' if err is None else f'{err:.1e}'} |"
        )
    return rows


def disagreements(results: list[Result], reference: Result | None, limit: int = 5) -> list[str]:
    lines: list[str] = []
    if reference is None:
        return lines
    for r in results:
        bad = [(k, v, r.ranks.get(k)) for k, v in reference.ranks.items() if r.ranks and r.ranks.get(k) != v]
        for name, want, got in bad[:limit]:
            lines.append(f"  {r.name}: {name}: rank {got}, reference {want}")
    return lines


def machine() -> dict[str, Any]:
    """Where the benchmark ran (read in a child: the parent imports no torch, see run_contestant)."""
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gb": round(mem / 2**20, 1),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    cfg = SIZES[args.size]
    where = Path(args.out) / args.size
    work = where / "runs"
    print(f"data: {where} ({args.size}: hidden {cfg.hidden}, {cfg.layers} layers)", file=sys.stderr)
    # the parent stays a small stdlib-only process: a child's peak RSS as reported by wait4 includes the memory of
    # the parent it was forked from, so generating data or importing torch here would inflate every measurement
    subprocess.run(_child_command("generate", args), check=True)
    info = json.loads((work / "machine.json").read_text())
    base, tuned = where / "base", where / "tuned"
    info["warm_read_s"] = round(warm_cache(base, tuned), 2)
    # whoever runs first would otherwise also pay for loading torch's libraries from disk and for the system
    # settling after generation (0.5 s measured): one untimed start-up of every library first
    subprocess.run(
        [sys.executable, "-c", "import torch, numpy, scipy.linalg, safetensors, spectra_cli.app"], check=True
    )
    info["load_avg_before"] = [round(x, 2) for x in os.getloadavg()]
    n_params = sum(math.prod(s) for _, s in tensor_shapes(cfg))
    largest = max(math.prod(s) for _, s in tensor_shapes(cfg) if len(s) == 2)
    print(
        f"{n_params / 1e6:.0f}M parameters per checkpoint; page cache warmed in {info['warm_read_s']} s; "
        f"load average {info['load_avg_before'][0]:.2f}",
        file=sys.stderr,
    )
    results = []
    for name in args.only:
        print(f"  running {name} ...", file=sys.stderr, flush=True)
        results.append(run_contestant(name, base, tuned, args, work))
        print(f"  {name}: {results[-1].wall_s:.1f} s, {results[-1].peak_rss_mib:.0f} MiB", file=sys.stderr)
    info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    reference = next((r for r in results if r.name == REFERENCE and r.ranks), None)
    if reference is None:
        reference = next((r for r in results if r.name == "exact" and r.ranks), None)
    rss_target = (2 * largest * 4 + 0.5 * 2**30) / 2**20
    lines = [
        f"size {args.size} ({n_params / 1e6:.0f}M params, bf16, {len(reference.ranks) if reference else '?'} "
        f"matrices), threads {args.threads or 'default'}, device {args.device}, reference "
        f"{reference.name if reference else 'none'}; {info['nproc']} × {info['cpu']}, torch {info['torch']}, "
        f"load average {info['load_avg_before'][0]:.2f} before, {info['load_avg_after'][0]:.2f} after",
        *table(results, reference),
        f"RSS target for fast: ≤ {rss_target:.0f} MiB (two largest tensors in float32 + 0.5 GB)",
    ]
    methods = next((r.methods for r in results if r.name == "fast"), {})
    if methods:
        counts: dict[str, int] = {}
        for m in methods.values():
            counts[m] = counts.get(m, 0) + 1
        lines.append("fast methods: " + ", ".join(f"{k} × {v}" for k, v in sorted(counts.items())))
    lines += disagreements(results, reference)
    print("\n".join(lines), flush=True)
    profile = run_profile(args, work) if args.profile else None
    record = {
        "machine": info,
        "size": args.size,
        "threads": args.threads,
        "device": args.device,
        "results": [
            {**asdict(r), "ranks": None, "methods": None, "sigma": None, "sigma_error": sigma_error(r, reference)}
            for r in results
        ],
        "agreement": {r.name: agreement(r, reference) for r in results},
        "profile": profile,
        "rss_target_mib": rss_target,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    (work / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(record, indent=1))
    return 0 if all(r.exit_code == 0 for r in results) else 1


def _child_command(name: str, args: argparse.Namespace) -> list[str]:
    where = Path(args.out) / args.size
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--out",
        args.out,
        "--size",
        args.size,
        "--seed",
        str(args.seed),
        "--base",
        str(where / "base"),
        "--tuned",
        str(where / "tuned"),
        "--device",
        args.device,
    ]
    return cmd + (["--threads", str(args.threads)] if args.threads is not None else [])


def run_profile(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Run the per-stage profile in a child process; print and return its split."""
    out = work / "profile.json"
    subprocess.run([*_child_command("profile", args), "--ranks-out", str(out)], check=True)
    split: dict[str, float] = json.loads(out.read_text())
    total = split["total"]
    print(
        "per-stage split of fast (serial, no overlap): "
        + ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in split.items() if k != "total")
        + f"; total {total:.2f} s"
    )
    return split


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="250m", help="model shape (default 250m)")
    p.add_argument("--out", default="bench-data", help="folder for the generated checkpoints (default ./bench-data)")
    p.add_argument(
        "--only",
        type=_contestants,
        default=list(CONTESTANTS),
        help=f"comma-separated contestants among {','.join(CONTESTANTS)} (default: all)",
    )
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every contestant (default: all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="for spectra and naive")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also print the per-stage split of the fast pipeline")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--tuned", help=argparse.SUPPRESS)
    p.add_argument("--ranks-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _contestants(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in CONTESTANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown contestant(s) {unknown}; choose among {', '.join(CONTESTANTS)}")
    return names


if __name__ == "__main__":
    sys.exit(main())
