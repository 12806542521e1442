"""Fuzz spectra's safetensors header parser in-process: mutated headers from a fixed seed, counts per outcome.

    python benchmarks/fuzz_headers.py                    # 10,000 cases, seed 18
    python benchmarks/fuzz_headers.py --n 100000 --seed 7 --timeout 2

Each case starts from a valid header (1-6 tensors of random dtypes and small shapes, contiguous data, sometimes a
`__metadata__`) and applies one to three mutations of the kinds in MUTATIONS (dtype, shape, offsets, names, metadata,
nesting, duplicate keys, truncation, random bytes, the length prefix, huge numbers, unicode, structure, data size).
`spectra.io.header.read_header` must then either load the file, with entries that describe it exactly (each range
inside the file, size = elements x itemsize, no two non-empty ranges sharing a byte), or raise one CheckpointError
line naming the file. Anything else is counted by signature (exception type, first line, innermost spectra frame);
a case running past --timeout is interrupted (SIGALRM) and counted as a hang. The `safetensors` package's verdict on
each case is tallied alongside (spectra refuses more: unsupported dtypes, duplicate keys, sizes beyond int64).

Exit status 1 if any case ended in something other than a load or a CheckpointError, or hung.
"""

from __future__ import annotations

import argparse
import collections
import gc
import itertools
import json
import math
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spectra.errors import CheckpointError
from spectra.io.header import ITEMSIZE, read_header

CODES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL"]
ODD_CODES = ["f32", "U16", "U32", "U64", "F4", "F8_E8M0", "C64", "", "F32 ", "\u0046\u0033\u0032\u0000", "BF16\n"]
ODD_VALUES: list[Any] = [None, True, False, 0, -1, 1.5, "", "x", [], {}, [1, 2], {"a": 1}, 2**64, -(2**63), 1e308]
ODD_NAMES = [
    "",
    "__metadata__",
    "\x1b[31mred",
    "new\nline",
    "tab\tname",
    "\u2028sep",
    "nul\x00name",
    "\U0001f600.weight",
    "é" * 300,
    "a" * 10_000,
    "\\ud800",
    "\\udfff tail",
    "\\ud83d\\ude00",
]


class Timeout(BaseException):
    pass


def _expire(signum: int, frame: object) -> None:
    raise Timeout


# ---------------------------------------------------------------------------------------------------- cases


def valid(rng: random.Random) -> tuple[dict[str, Any], int]:
    header: dict[str, Any] = {}
    if rng.random() < 0.3:
        header["__metadata__"] = {"format": "pt"}
    offset = 0
    for i in range(rng.randint(1, 6)):
        code = rng.choice(CODES)
        shape = [rng.randint(0, 5) for _ in range(rng.choice([0, 1, 2, 2, 3]))]
        nbytes = math.prod(shape) * ITEMSIZE[code]
        header[f"model.layers.{i}.w"] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return header, offset


def tensors(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def pick(rng: random.Random, header: dict[str, Any]) -> dict[str, Any]:
    names = tensors(header)
    return header[rng.choice(names)] if names else header.setdefault("t", {"dtype": "F32"})


def m_dtype(rng: random.Random, h: dict[str, Any], size: int) -> int:
    pick(rng, h)["dtype"] = rng.choice([*CODES, *ODD_CODES, *ODD_VALUES])
    return size


def m_shape(rng: random.Random, h: dict[str, Any], size: int) -> int:
    t = pick(rng, h)
    choices: list[Any] = [
        [],
        [-1],
        [2.0],
        [True],
        ["3"],
        [[2], [2]],
        [2**62, 2**62],
        [2**63],
        [2**64 - 1],
        [0, 2**64 - 1],
        [10**30],
        [1] * rng.randint(60, 5000),
        [2] * rng.randint(60, 200),
        [rng.randint(0, 2**40) for _ in range(rng.randint(1, 4))],
        [None],
        None,
        "2x2",
        {"0": 2},
    ]
    t["shape"] = rng.choice(choices)
    return size


def m_offsets(rng: random.Random, h: dict[str, Any], size: int) -> int:
    t = pick(rng, h)
    offsets = t.get("data_offsets")
    ints = isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)
    begin, end = offsets if ints else (0, 0)
    other = pick(rng, h).get("data_offsets")
    choices: list[Any] = [
        [end, begin],
        [begin + rng.randint(-3, 3), end + rng.randint(-3, 3)],
        [begin],
        [begin, end, end],
        [begin, 2**63],
        [begin, 2**64 + 5],
        [-1, end],
        [float(begin), end],
        other,
        [0, end - begin],
        None,
        "0,4",
    ]
    t["data_offsets"] = rng.choice(choices)
    return size


def m_names(rng: random.Random, h: dict[str, Any], size: int) -> int:
    names = tensors(h)
    if names:
        old = rng.choice(names)
        h[rng.choice(ODD_NAMES)] = h.pop(old)
    return size


def m_metadata(rng: random.Random, h: dict[str, Any], size: int) -> int:
    h["__metadata__"] = rng.choice([None, [], "pt", 1, {"a": 1}, {"a": None}, {"a": {"b": "c"}}, {"\\ud800": "x"}])
    return size


def m_size(rng: random.Random, h: dict[str, Any], size: int) -> int:
    return max(0, size + rng.choice([-4096, -17, -1, 1, 3, 4096]))


DICT_MUTATIONS: dict[str, Callable[[random.Random, dict[str, Any], int], int]] = {
    "dtype": m_dtype,
    "shape": m_shape,
    "offsets": m_offsets,
    "names": m_names,
    "metadata": m_metadata,
    "data_size": m_size,
}


def t_nesting(rng: random.Random, text: str) -> str:
    depth = rng.choice([20, 129, 1000, 5000, 100_000])
    inner = rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])
    where = rng.choice(['"shape": ', '"data_offsets": ', '"dtype": ', '"__metadata__": ', "top"])
    if where not in text:
        return inner
    if rng.random() < 0.5:  # the value itself (the old one moves to an unknown field)
        return text.replace(where, where + inner + ', "zz": ', 1)
    return text.replace(where, '"zz": ' + inner + ", " + where, 1)  # an unknown field beside it


def t_duplicate(rng: random.Random, text: str) -> str:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        doc = None
    names = [k for k in doc if k != "__metadata__"] if isinstance(doc, dict) else []
    if not names:
        return text.replace('"dtype": ', '"dtype": "F32", "dtype": ', 1)
    name = rng.choice(names)
    copy = json.dumps({name: doc[name]})[1:-1]
    if rng.random() < 0.5:  # the same tensor twice
        return text[:-1] + ", " + copy + "}"
    return text.replace('"dtype": ', '"dtype": "F32", "dtype": ', 1)  # a field twice


def t_huge_numbers(rng: random.Random, text: str) -> str:
    digits = rng.choice([21, 65, 4301, 50_000])
    number = rng.choice(["9" * digits, "1e999", "-0", "NaN", "Infinity", "-Infinity", "1" + "0" * digits + ".5"])
    for key in ('"shape": [', '"data_offsets": ['):
        if key in text and rng.random() < 0.7:
            return text.replace(key, key + number + ", ", 1)
    return text.replace("0", number, 1)


def t_structure(rng: random.Random, text: str) -> str:
    return rng.choice(
        [
            "[" + text + "]",
            '"' + text.replace('"', "'") + '"',
            "12345",
            "null",
            text + " trailing",
            text + "\x00\x00\x00",
            "   \n\t" + text,
            text.replace('"dtype"', '"dtypo"', 1),
            text.replace('"shape"', '"Shape"', 1),
            text.replace('"data_offsets": ', '"data_offsets": [0, 4], "extra": ', 1),
            "{}",
            "{" + text,
            text[:-1],
        ]
    )


TEXT_MUTATIONS: dict[str, Callable[[random.Random, str], str]] = {
    "nesting": t_nesting,
    "duplicate": t_duplicate,
    "huge_numbers": t_huge_numbers,
    "structure": t_structure,
}


def b_unicode(rng: random.Random, blob: bytes) -> bytes:
    text = blob.decode("utf-8", "surrogateescape")
    return rng.choice(
        [
            lambda: text.encode("utf-16-le", "surrogatepass"),
            lambda: text.encode("utf-32", "surrogatepass"),
            lambda: b"\xef\xbb\xbf" + blob,
            lambda: blob.replace(b'"model', b'"\xc0\x80model', 1),
            lambda: blob.replace(b'"model', b'"\xffmodel', 1),
            lambda: blob.replace(b'"model', b'"\xed\xa0\x80model', 1),  # a surrogate encoded in UTF-8
            lambda: blob.replace(b'"model', '"\u00e9\u4e2d\U0001f600model'.encode(), 1),
        ]
    )()


def b_random_bytes(rng: random.Random, blob: bytes) -> bytes:
    data = bytearray(blob)
    for _ in range(rng.randint(1, 8)):
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


BYTE_MUTATIONS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "unicode": b_unicode,
    "random_bytes": b_random_bytes,
}
FILE_MUTATIONS = ("truncate", "length_prefix")
MUTATIONS = [*DICT_MUTATIONS, *TEXT_MUTATIONS, *BYTE_MUTATIONS, *FILE_MUTATIONS]


def case(rng: random.Random) -> tuple[bytes, list[str]]:
    """One mutated file and the mutation kinds applied, in order."""
    header, size = valid(rng)
    kinds = rng.sample(MUTATIONS, rng.choice([1, 1, 1, 2, 3]))
    for kind in kinds:
        if kind in DICT_MUTATIONS:
            size = DICT_MUTATIONS[kind](rng, header, size)
    text = json.dumps(header, ensure_ascii=rng.random() < 0.5).replace("\\\\ud", "\\ud")
    for kind in kinds:
        if kind in TEXT_MUTATIONS:
            text = TEXT_MUTATIONS[kind](rng, text)
    blob = text.encode("utf-8", "surrogatepass")
    for kind in kinds:
        if kind in BYTE_MUTATIONS:
            blob = BYTE_MUTATIONS[kind](rng, blob)
    prefix = len(blob)
    if "length_prefix" in kinds:
        prefix = rng.choice([0, 1, 2, prefix - 1, prefix + 1, prefix + size + 1, 2**63, 2**64 - 1, 100 * 2**20 + 1])
    data = struct.pack("<Q", prefix) + blob + bytes(size)
    if "truncate" in kinds:
        data = data[: rng.randrange(len(data) + 1)]
    return data, kinds


# ---------------------------------------------------------------------------------------------------- verdicts


def check_loaded(entries: dict[str, Any], size: int) -> str | None:
    """None if the entries describe the file exactly, else what is wrong (a silent misread)."""
    spans = []
    for name, e in entries.items():
        if e.nbytes != math.prod(e.shape) * ITEMSIZE[e.code]:
            return f"{name!r}: nbytes {e.nbytes} != shape {e.shape} x itemsize"
        if not 0 <= e.start <= e.start + e.nbytes <= size:
            return f"{name!r}: range outside the file"
        if e.nbytes:
            spans.append((e.start, e.start + e.nbytes))
    spans.sort()
    if any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
        return "overlapping ranges"
    return None


def signature(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "spectra" in f.filename]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    first = (str(exc).splitlines() or [""])[0][:80]
    return f"{type(exc).__name__}: {first}{where}"


def safetensors_verdict(path: Path) -> str:
    try:
        from safetensors import safe_open
    except ImportError:
        return "n/a"
    try:
        with safe_open(str(path), "np") as f:
            list(f.keys())
        return "loads"
    except Exception:
        return "refuses"


def run(n: int, seed: int, timeout: float, compare: bool) -> dict[str, Any]:
    gc.collect()  # garbage left by the caller (a hypothesis run, in the test suite) slows every collection here
    rng = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    others: collections.Counter[str] = collections.Counter()
    kinds_seen: collections.Counter[str] = collections.Counter()
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    versus: collections.Counter[str] = collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)
    slowest = (0.0, "")
    previous = signal.signal(signal.SIGALRM, _expire)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.safetensors"
        for i in range(n):
            data, kinds = case(rng)
            path.write_bytes(data)
            kinds_seen.update(kinds)
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                entries = read_header(path)
                problem = check_loaded(entries, len(data))
                outcome = "loaded" if problem is None else "misread"
                if problem is not None:
                    others[f"misread: {problem}"] += 1
            except CheckpointError as exc:
                message = str(exc)
                outcome = "CheckpointError"
                if len(message.splitlines()) != 1 or not message.startswith(str(path)):
                    outcome = "bad message"
                    others[f"bad message: {message[:80]!r}"] += 1
            except Timeout:
                outcome = "timeout"
            except Exception as exc:
                outcome = "other exception"
                others[signature(exc)] += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.perf_counter() - t0
            slowest = max(slowest, (elapsed, "+".join(kinds)))
            outcomes[outcome] += 1
            for kind in kinds:
                by_kind[kind][outcome] += 1
            if outcome not in ("loaded", "CheckpointError") and len(examples[outcome]) < 3:
                examples[outcome].append(f"case {i} ({'+'.join(kinds)})")
            if compare:
                theirs = safetensors_verdict(path)
                ours = "loads" if outcome == "loaded" else "refuses"
                versus[f"spectra {ours}, safetensors {theirs}"] += 1
    signal.signal(signal.SIGALRM, previous)
    return {
        "n": n,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 2),
        "outcomes": dict(outcomes),
        "other_signatures": dict(others),
        "examples": dict(examples),
        "mutation_kinds": dict(sorted(kinds_seen.items())),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "versus_safetensors": dict(versus),
        "slowest_case_s": round(slowest[0], 4),
        "slowest_case_kinds": slowest[1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--no-compare", action="store_true", help="skip the safetensors package's verdicts")
    args = parser.parse_args()
    result = run(args.n, args.seed, args.timeout, not args.no_compare)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    bad = sum(v for k, v in result["outcomes"].items() if k not in ("loaded", "CheckpointError"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
