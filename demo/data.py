"""The demo's corpus: docstring -> function source pairs from the running interpreter's standard library.

Every machine that runs spectra has this corpus, so the demo needs no download. A pair's query is the summary
paragraph of a function's docstring; its document is the function's source with the docstring cut out (otherwise
retrieval would be string matching). Extraction and the train/test split are deterministic for one interpreter.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import sysconfig
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from spectra import OptionsError

log = logging.getLogger(__name__)

# Folders of the standard library that are tests, vendored third-party code or IDE internals, not library code.
SKIP_PARTS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib"})
MIN_QUERY_WORDS = 3
MIN_CODE_LINES = 2  # after the docstring is cut: the def line and at least one statement


@dataclass(frozen=True, slots=True)
class CodePair:
    """One docstring -> code retrieval pair."""

    query: str  # the docstring's first paragraph, whitespace collapsed
    code: str  # the function's source without its docstring, dedented
    origin: str  # "relative/path.py:line", unique within a corpus


@dataclass(frozen=True, slots=True)
class Corpus:
    """The extracted pairs split into a training pool and a fixed held-out set."""

    train: tuple[CodePair, ...]
    test: tuple[CodePair, ...]
    n_files: int  # files that contributed at least one pair
    root: str  # the library folder the pairs came from


def stdlib_root() -> Path:
    """Return the folder of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def library_files(root: Path) -> list[Path]:
    """Return the `.py` files under `root`, sorted, without tests, vendored packages and IDE internals."""
    return sorted(
        p
        for p in root.rglob("*.py")
        if not any(part in SKIP_PARTS or part.startswith("test") for part in p.relative_to(root).parts[:-1])
        and not p.name.startswith("test_")
    )


def _summary(docstring: str) -> str:
    return " ".join(docstring.strip().split("\n\n", 1)[0].split())


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def file_pairs(path: Path, origin: str) -> list[CodePair]:
    """Return the pairs of one source file, in source order; unreadable or unparsable files give none.

    Args:
        path: a Python source file.
        origin: its name in `CodePair.origin`, e.g. the path relative to the library root.
    """
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        log.debug("skipped %s: unreadable or not valid for this interpreter", path)
        return []
    lines = text.splitlines()
    pairs = []
    for node in _functions(tree):
        docstring = ast.get_docstring(node)
        first = node.body[0]
        if not docstring or first.lineno <= node.lineno or node.end_lineno is None or first.end_lineno is None:
            continue  # no docstring, or one on the def line, which a line cut cannot remove
        kept = lines[node.lineno - 1 : first.lineno - 1] + lines[first.end_lineno : node.end_lineno]
        code = textwrap.dedent("\n".join(kept)).strip()
        query = _summary(docstring)
        if len(query.split()) >= MIN_QUERY_WORDS and len(code.splitlines()) >= MIN_CODE_LINES:
            pairs.append(CodePair(query=query, code=code, origin=f"{origin}:{node.lineno}"))
    return pairs


def extract_pairs(root: Path | None = None) -> tuple[tuple[CodePair, ...], int]:
    """Return (pairs, number of contributing files) from every library file under `root`, deduplicated.

    A query or a code text seen before (overloads, copied helpers) is dropped, so that in-batch negatives and
    top-1 retrieval never have two right answers.

    Args:
        root: a folder of Python sources; defaults to the running interpreter's standard library.
    """
    root = root or stdlib_root()
    pairs: list[CodePair] = []
    seen: set[str] = set()
    files = set()
    for path in library_files(root):
        for pair in file_pairs(path, path.relative_to(root).as_posix()):
            if pair.query in seen or pair.code in seen:
                continue
            seen.update((pair.query, pair.code))
            pairs.append(pair)
            files.add(path)
    return tuple(pairs), len(files)


def _order_key(pair: CodePair) -> str:
    return hashlib.sha256(pair.origin.encode()).hexdigest()


def split_pairs(pairs: Sequence[CodePair], n_test: int) -> tuple[tuple[CodePair, ...], tuple[CodePair, ...]]:
    """Return (train, test): a hash of each pair's origin orders the pairs, the first `n_test` are held out.

    The split depends on nothing but the pairs, so every run on the same interpreter holds out the same pairs.

    Args:
        pairs: the corpus.
        n_test: size of the held-out set, 1 ≤ n_test < len(pairs).
    """
    ordered = sorted(pairs, key=_order_key)
    return tuple(ordered[n_test:]), tuple(ordered[:n_test])


def load_corpus(n_test: int, root: Path | None = None) -> Corpus:
    """Return the corpus of `root` (default: the standard library) split into train and a held-out set of `n_test`.

    Raises:
        OptionsError: the library holds fewer than n_test + 1 pairs.
    """
    root = root or stdlib_root()
    pairs, n_files = extract_pairs(root)
    if not 1 <= n_test < len(pairs):
        raise OptionsError(f"{root}: {len(pairs)} docstring/code pairs, not enough for a held-out set of {n_test}")
    train, test = split_pairs(pairs, n_test)
    return Corpus(train=train, test=test, n_files=n_files, root=str(root))
