"""The flags shared by every command that analyses checkpoints, declared once.

Each flag is named after the `Options` field it sets and defaults to that field's default. A command takes them all
with `@options_flags` and receives the validated `Options` they build (a bad value exits 2 with one line on stderr):

    @app.command()
    @options_flags
    def rank(base: Checkpoint, tuned: Tuned = None, *, options: Options) -> None: ...

typer reads the command's signature, so the decorator presents the command's own parameters followed by these flags.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from spectra import Options, OptionsError

from .console import setup_logging, user_errors

DEFAULTS = Options()

Threshold = Annotated[float, typer.Option(help="share of ‖ΔW‖_F² the rank must explain, in (0, 1]")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda")]
Precision = Annotated[str, typer.Option(help="fast (Gram + eigvalsh) | exact (float64 SVD)")]
Include = Annotated[str | None, typer.Option(help="analyse only tensors whose name matches this regex")]
Exclude = Annotated[str | None, typer.Option(help="skip tensors whose name matches this regex")]
LoraRanks = Annotated[str, typer.Option(help="LoRA ranks for captured energy")]
BatchBytes = Annotated[int | None, typer.Option(help="bytes of ΔW stacked per batch (default: derived)")]
Threads = Annotated[int | None, typer.Option(help="cap on CPU threads (default: torch's)")]
Download = Annotated[bool, typer.Option(help="let huggingface_hub fetch a hub id missing from the cache")]
Devices = Annotated[
    str | None, typer.Option(help="local devices, one worker each, e.g. cuda:0,cuda:1 (default: every visible GPU)")
]
Executor = Annotated[
    str,
    typer.Option(help="local | ray (a local Ray, started on demand) | ray://HOST:PORT or ray:ADDRESS (a Ray cluster)"),
]
RayAddress = Annotated[
    str | None, typer.Option(help="join this Ray cluster: auto, HOST:PORT or ray://HOST:PORT (implies --executor ray)")
]
BaseQuantization = Annotated[
    str | None, typer.Option(help="nf4 | fp4 | int8: diff against the base as QLoRA quantised it (bitsandbytes)")
]
QuantBlockSize = Annotated[int, typer.Option(help="absmax block size of --base-quantization nf4/fp4")]
DoubleQuant = Annotated[bool, typer.Option(help="--base-quantization nf4/fp4 with double quantisation (QLoRA's)")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="log decisions (skips, batches, device) to stderr")]

# Options field -> its flag (the flag is --field-name); every field of Options has one
OPTIONS_FLAGS: dict[str, Any] = {
    "threshold": Threshold,
    "device": Device,
    "precision": Precision,
    "include": Include,
    "exclude": Exclude,
    "lora_ranks": LoraRanks,
    "batch_bytes": BatchBytes,
    "threads": Threads,
    "download": Download,
    "devices": Devices,
    "executor": Executor,
    "ray_address": RayAddress,
    "base_quantization": BaseQuantization,
    "quant_block_size": QuantBlockSize,
    "double_quant": DoubleQuant,
}


def format_ranks(ranks: tuple[int, ...]) -> str:
    return ",".join(map(str, ranks))


def parse_ranks(text: str) -> tuple[int, ...]:
    """--lora-ranks "8,16,64" -> (8, 16, 64); Options validates the values."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise OptionsError(f"--lora-ranks takes comma-separated integers like 8,16,64, got {text!r}") from None


def parse_devices(text: str | None) -> tuple[str, ...] | None:
    """--devices "cuda:0, cuda:1" -> ("cuda:0", "cuda:1"); None or empty -> None (the default); Options validates."""
    names = tuple(x.strip() for x in (text or "").split(",") if x.strip())
    return names or None


def build_options(**flags: Any) -> Options:
    """The validated Options of the shared flags' values (--lora-ranks and --devices as text).

    Raises:
        OptionsError: a value out of range, or --lora-ranks not a list of integers.
    """
    parsed = {"lora_ranks": parse_ranks(flags["lora_ranks"]), "devices": parse_devices(flags.get("devices"))}
    return Options(**{**flags, **parsed})


def _parameter(name: str, annotation: Any) -> inspect.Parameter:
    default = getattr(DEFAULTS, name)
    if name == "lora_ranks":
        default = format_ranks(default)
    elif name == "devices" and default is not None:
        default = ",".join(default)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


SHARED = (
    *(_parameter(name, flag) for name, flag in OPTIONS_FLAGS.items()),
    inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=Verbose, default=False),
)


def options_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the shared flags (and --verbose); it is called with `options=` the Options they build.

    `command` declares its own arguments and options as usual plus a keyword-only `options: Options`; logging is
    set up for --verbose before it runs, and a bad flag value exits 2 before it runs.
    """
    own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != "options"]

    @functools.wraps(command)
    def with_options(**values: Any) -> None:
        shared = {p.name: values.pop(p.name) for p in SHARED}
        setup_logging(shared.pop("verbose"))
        with user_errors():
            options = build_options(**shared)
        command(**values, options=options)

    with_options.__signature__ = inspect.Signature([*own, *SHARED])  # type: ignore[attr-defined]
    return with_options
