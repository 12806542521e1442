"""Benchmark `spectra extract` against mergekit-extract-lora, end to end, each in its own process.

    python benchmarks/bench_extract.py                    # ≈250M Llama-shaped bf16 pair (bench_rank's generator)
    python benchmarks/bench_extract.py --size 1b --only spectra-r64,mergekit-r64

1. Generates (once; bench_rank's generator and manifest) the base/tuned pair and writes a Hugging Face config.json
   beside each (LlamaForCausalLM with those shapes), which mergekit and transformers need.
2. Installs mergekit into its own virtual environment inside the data folder (DATA/mergekit-venv: torch, then
   mergekit; once).
3. Reads every file once so that all contestants start from the page cache, then runs each contestant as a child
   process, wall time and peak RSS from os.wait4 (that child alone):
   - spectra-r64:  `spectra extract BASE TUNED -o OUT --rank 64`
   - spectra-auto: `spectra extract BASE TUNED -o OUT --rank auto`
   - mergekit-r64: `mergekit-extract-lora --model TUNED --base-model BASE --out-path OUT --max-rank 64`
4. Evaluates every adapter in another (untimed) child with PEFT itself: the base model is loaded in float32,
   PeftModel.from_pretrained(adapter).merge_and_unload(), and every LoRA-adapted weight is compared with TUNED:
   relative error ‖W_merged − W_tuned‖_F / ‖ΔW‖_F, aggregated over the adapted 2-D modules (√(Σ err² / Σ ‖ΔW‖²))
   and its worst module; LoRA parameters, tensors saved at full size (modules_to_save) and the adapter's bytes.
   For spectra the predicted error is printed next to the measured one.

The parent imports only the standard library (a child's peak RSS reported by wait4 includes the memory of the
process it was started from). Results go to DATA/SIZE/runs/extract-results-*.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONTESTANTS = ("spectra-r64", "spectra-auto", "mergekit-r64")
MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"


# ---------------------------------------------------------------------------------------------------- children


def generate(size: str, where: Path, seed: int) -> None:
    """bench_rank's pair, plus the config.json of a LlamaForCausalLM with its shapes in both folders."""
    sys.path.insert(0, str(HERE))
    import bench_rank

    cfg = bench_rank.SIZES[size]
    base, tuned = bench_rank.generate_pair(cfg, where, seed)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "vocab_size": cfg.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    for folder in (base, tuned):
        (folder / "config.json").write_text(json.dumps(config, indent=1))
    (where / "runs").mkdir(exist_ok=True)
    sys.path.insert(0, str(HERE))
    (where / "runs" / "machine.json").write_text(json.dumps(bench_rank.machine()))


def evaluate(base: Path, tuned: Path, adapter: Path, out: Path) -> None:
    """Merge the adapter with PEFT onto the float32 base and measure every adapted weight against TUNED."""
    import warnings

    import peft
    import torch
    import transformers
    from safetensors import safe_open

    warnings.simplefilter("ignore")
    index = json.loads((tuned / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in keys}
    config = json.loads((adapter / "adapter_config.json").read_text())
    lora = [k for k in keys if ".lora_A" in k or ".lora_embedding_A" in k]
    modules = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in lora}
    lora_params = sum(math.prod(shapes[k]) for k in keys if ".lora_" in k)
    full_params = sum(math.prod(shapes[k]) for k in keys if ".lora_" not in k)
    model = transformers.LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    state = merged.state_dict()
    files: dict[str, Any] = {}

    def read(folder: Path, name: str) -> Any:
        file = str(folder / index[name])
        if file not in files:
            files[file] = safe_open(file, "pt")
        return files[file].get_tensor(name).double()

    errors: dict[str, float] = {}
    lost = total = 0.0
    for module in sorted(modules):
        name = f"{module}.weight"
        w_tuned = read(tuned, name)
        delta = float(torch.linalg.vector_norm(w_tuned - read(base, name))) ** 2
        err = float(torch.linalg.vector_norm(state[name].double() - w_tuned)) ** 2
        errors[name] = math.sqrt(err / delta)
        lost, total = lost + err, total + delta
    record = {
        "modules": len(modules),
        "lora_params": lora_params,
        "full_size_params": full_params,
        "modules_to_save": config.get("modules_to_save") or [],
        "embeddings_adapted": sorted(m for m in modules if "embed" in m or "lm_head" in m),
        "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
        "dtypes": sorted({str(t) for t in _dtypes(adapter)}),
        "error": math.sqrt(lost / total) if total else 0.0,
        "max_error": max(errors.values(), default=0.0),
        "errors": errors,
    }
    out.write_text(json.dumps(record))


def _dtypes(adapter: Path) -> set[str]:
    header = (adapter / "adapter_model.safetensors").read_bytes()[:8]
    size = int.from_bytes(header, "little")
    with open(adapter / "adapter_model.safetensors", "rb") as fh:
        fh.seek(8)
        meta = json.loads(fh.read(size))
    return {v["dtype"] for k, v in meta.items() if k != "__metadata__"}


def machine_line(info: dict[str, Any]) -> str:
    return f"{info['nproc']} × {info['cpu']}, {info['ram_gb']} GiB, torch {info['torch']}, {info['date']}"


# ---------------------------------------------------------------------------------------------------- parent


@dataclass(slots=True)
class Result:
    name: str
    wall_s: float
    cpu_s: float  # user + system CPU seconds of the child (robust to other load on a shared machine)
    peak_rss_mib: float
    exit_code: int
    out: str
    evaluation: dict[str, Any] = field(default_factory=dict)
    predicted_error: float | None = None


def mergekit_venv(data: Path) -> Path:
    """The mergekit-extract-lora of DATA/mergekit-venv, installed there first if missing (torch, then mergekit)."""
    venv = data / "mergekit-venv"
    script = venv / "bin" / "mergekit-extract-lora"
    if not script.is_file():
        print(f"  installing {MERGEKIT} into {venv} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, TORCH], check=True)
        subprocess.run([*pip, MERGEKIT], check=True)
    return script


def command(name: str, base: Path, tuned: Path, out: Path, data: Path, threads: int | None) -> list[str]:
    if name.startswith("spectra"):
        spectra = Path(sys.executable).with_name("spectra")
        cmd = [str(spectra)] if spectra.is_file() else [sys.executable, "-m", "spectra_cli"]
        rank = "64" if name == "spectra-r64" else "auto"
        cmd += ["extract", str(base), str(tuned), "-o", str(out), "--rank", rank, "--overwrite", "--device", "cpu"]
        cmd += ["--json", str(out.with_suffix(".json"))]
        return cmd + (["--threads", str(threads)] if threads else [])
    cmd = [str(mergekit_venv(data)), "--model", str(tuned), "--base-model", str(base), "--out-path", str(out)]
    cmd += ["--max-rank", "64", "--device", "cpu"]
    return cmd + (["--num-threads", str(threads)] if threads else [])


def run_contestant(name: str, base: Path, tuned: Path, work: Path, data: Path, threads: int | None) -> Result:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = command(name, base, tuned, out, data, threads)
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    with open(work / f"{name}.log", "wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = (work / f"{name}.log").read_text(errors="replace")[-3000:]
        print(f"  {name} failed (exit {code}):\n{tail}", file=sys.stderr)
    result = Result(name, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, code, str(out))
    if code == 0 and out.with_suffix(".json").is_file():
        result.predicted_error = json.loads(out.with_suffix(".json").read_text())["error"]
    return result


def child(name: str, args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", args.out, "--size", args.size,
            "--seed", str(args.seed), *extra]  # fmt: skip


def table(results: list[Result]) -> list[str]:
    ref = next((r for r in results if r.name == "spectra-r64" and r.exit_code == 0), None)
    head = ("| contestant | wall s | CPU s | × spectra r64 (CPU) | peak RSS MiB | LoRA params | full-size params "
            "| adapter MiB | merged error | worst module | predicted |")  # fmt: skip
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        e = r.evaluation
        ratio = f"{r.cpu_s / ref.cpu_s:.2f}" if ref else "-"
        timing = f"| {r.name} | {r.wall_s:.1f} | {r.cpu_s:.1f} | {ratio} | {r.peak_rss_mib:.0f} "
        if r.exit_code != 0 or not e:
            lines.append(timing + "| failed | | | | | |")
            continue
        predicted = "-" if r.predicted_error is None else f"{r.predicted_error:.6f}"
        sizes = (
            f"| {e['lora_params'] / 1e6:.2f}M | {e['full_size_params'] / 1e6:.2f}M | {e['adapter_bytes'] / 2**20:.0f} "
        )
        lines.append(timing + sizes + f"| {e['error']:.6f} | {e['max_error']:.4f} | {predicted} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = Path(args.out).resolve()
    where = data / args.size
    if args.child == "generate":
        generate(args.size, where, args.seed)
        return 0
    if args.child == "evaluate":
        evaluate(where / "base", where / "tuned", Path(args.adapter), Path(args.result))
        return 0
    work = where / "runs" / "extract"
    print(f"data: {where}", file=sys.stderr)
    subprocess.run(child("generate", args), check=True)
    work.mkdir(parents=True, exist_ok=True)
    if any(n.startswith("mergekit") for n in args.only):
        mergekit_venv(data)
    info = json.loads((where / "runs" / "machine.json").read_text())
    base, tuned = where / "base", where / "tuned"
    sys.path.insert(0, str(HERE))
    from bench_rank import warm_cache

    info["warm_read_s"] = round(warm_cache(base, tuned), 2)
    subprocess.run([sys.executable, "-c", "import torch, numpy, safetensors, spectra_cli.app"], check=True)
    info["load_avg_before"] = [round(x, 2) for x in os.getloadavg()]
    results = []
    for name in args.only:
        print(f"  running {name} ...", file=sys.stderr, flush=True)
        results.append(run_contestant(name, base, tuned, work, data, args.threads))
        r = results[-1]
        load = os.getloadavg()[0]
        print(
            f"  {name}: {r.wall_s:.1f} s, {r.cpu_s:.1f} CPU s, {r.peak_rss_mib:.0f} MiB (load {load:.2f})",
            file=sys.stderr,
        )
    info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    if not args.no_eval:
        for r in results:
            if r.exit_code == 0:
                print(f"  evaluating {r.name} with PEFT ...", file=sys.stderr, flush=True)
                file = work / f"{r.name}.eval.json"
                subprocess.run(child("evaluate", args, "--adapter", r.out, "--result", str(file)), check=True)
                r.evaluation = json.loads(file.read_text())
    lines = [
        f"size {args.size}, threads {args.threads or 'default'}; {machine_line(info)}; load average "
        f"{info['load_avg_before'][0]:.2f} before, {info['load_avg_after'][0]:.2f} after",
        *table(results),
    ]
    for r in results:
        e = r.evaluation
        if e:
            saved, adapted = e["modules_to_save"] or "none", e["embeddings_adapted"] or "none"
            lines.append(
                f"{r.name}: {e['modules']} LoRA modules, dtypes {','.join(e['dtypes'])}, modules_to_save {saved}, "
                f"LoRA on embeddings {adapted}"
            )
    print("\n".join(lines), flush=True)
    record = {
        "machine": info,
        "size": args.size,
        "threads": args.threads,
        "results": [{**asdict(r), "evaluation": _brief(r.evaluation)} for r in results],
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    (work / f"extract-results-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(record, indent=1))
    return 0 if all(r.exit_code == 0 for r in results) else 1


def _brief(evaluation: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in evaluation.items() if k != "errors"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=("250m", "1b", "7b"), default="250m", help="model shape (default 250m)")
    p.add_argument("--out", default="bench-data", help="folder for the generated data (default ./bench-data)")
    p.add_argument("--only", type=_contestants, default=list(CONTESTANTS), help=f"among {','.join(CONTESTANTS)}")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every contestant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eval", action="store_true", help="skip the PEFT merge evaluation")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _contestants(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in CONTESTANTS for n in names):
        raise argparse.ArgumentTypeError(f"choose among {', '.join(CONTESTANTS)}")
    return names


if __name__ == "__main__":
    sys.exit(main())
