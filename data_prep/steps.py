"""Corpus pipeline steps in datatrove's shape.

Each step is a class with `run(data, rank=0, world_size=1)` that takes and yields
`Document`s, like `datatrove.pipeline.base.PipelineStep`, and counts what it did in
`self.stats`. Readers ignore their input and yield documents; filters and
normalisers transform the stream. `run_pipeline` chains them in one process; the
same classes can later be wrapped as datatrove blocks and sharded over many
workers (`rank`/`world_size` select a shard of the input files).

Sizes: the embedded default reads the Python standard library that ships with
the interpreter, less its tests, IDLE, lib2to3 and turtledemo: 578 modules on
Python 3.11, which give 1,062 documents and 11.5 MB of text; 60 of them are enough
for the tests.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sysconfig
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from data_prep.artifacts import UserError

LOCAL_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")


@dataclass
class Document:
    text: str
    id: str
    metadata: dict = field(default_factory=dict)


class PipelineStep:
    name = "step"

    def __init__(self) -> None:
        self.stats: Counter = Counter()

    def run(self, data: Iterable[Document] | None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        raise NotImplementedError

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        return self.run(data, rank, world_size)


def run_pipeline(steps: list[PipelineStep]) -> Iterator[Document]:
    data: Iterable[Document] | None = None
    for step in steps:
        data = step.run(data)
    return iter(data or ())


# ----------------------------------------------------------------------------- readers
class StdlibReader(PipelineStep):
    """The embedded default: real prose and code that every Python install carries.

    For each module it yields the source file (code) and, separately, its docstrings
    joined into one prose document, so the corpus mixes natural language and code.
    Files are visited in sorted order, so the corpus is the same on every machine with
    the same Python version.
    """

    name = "stdlib_reader"
    skip_dirs = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}

    def __init__(self, max_files: int | None = None, max_file_bytes: int = 200_000) -> None:
        super().__init__()
        self.root = Path(sysconfig.get_paths()["stdlib"])
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self._files: list[Path] | None = None

    def files(self) -> list[Path]:
        if self._files is None:
            paths = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = sorted(d for d in dirnames if d not in self.skip_dirs)  # prune while walking
                for name in filenames:
                    path = Path(dirpath) / name
                    if name.endswith(".py") and path.stat().st_size <= self.max_file_bytes:
                        paths.append(path)
            paths.sort()
            self._files = paths[: self.max_files] if self.max_files else paths
        return self._files

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for path in self.files()[rank::world_size]:
            rel = str(path.relative_to(self.root))
            try:
                source = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                self.stats["unreadable"] += 1
                continue
            self.stats["files"] += 1
            yield Document(source, f"stdlib:{rel}", {"source": "stdlib", "kind": "code", "path": rel})
            prose = "\n\n".join(_docstrings(source))
            if prose:
                yield Document(prose, f"stdlib:{rel}#doc", {"source": "stdlib", "kind": "prose", "path": rel})


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [doc for doc in (ast.get_docstring(n) for n in nodes) if doc and len(doc) > 40]


class LocalFileReader(PipelineStep):
    """Local .txt, .md, .jsonl, .json and .parquet files (or directories of them).

    .txt/.md files are one document each; .jsonl/.json/.parquet rows take their text
    from `text_field`. Bad input stops with an error naming the file and line.
    """

    name = "local_reader"

    def __init__(self, paths: list[str], text_field: str = "text") -> None:
        super().__init__()
        self.paths = paths
        self.text_field = text_field

    def files(self) -> list[Path]:
        found = []
        for raw in self.paths:
            path = Path(raw)
            if path.is_dir():
                inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in LOCAL_SUFFIXES and p.is_file())
                if not inside:  # a folder of .csv or .html files would add nothing without a word
                    raise UserError(f"{path}: no {', '.join(LOCAL_SUFFIXES)} file in this folder")
                found += inside
            elif path.is_file():
                if path.suffix.lower() not in LOCAL_SUFFIXES:
                    raise UserError(f"{path}: unsupported file type (use one of {', '.join(LOCAL_SUFFIXES)})")
                found.append(path)
            else:
                raise UserError(f"input file not found: {path}")
        return found

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for path in self.files()[rank::world_size]:
            self.stats["files"] += 1
            if path.suffix.lower() == ".parquet":
                yield from self._parquet(path)
                continue
            text = read_utf8(path)
            if path.suffix.lower() in (".txt", ".md"):
                yield Document(text, str(path), {"source": "local", "path": str(path)})
            else:
                for position, row, unit in json_records(path, text):
                    yield self._row(row, path, position, unit=unit)

    def _parquet(self, path: Path):
        table = read_parquet(path)
        if self.text_field not in table.column_names:
            raise UserError(f"{path}: no column '{self.text_field}' (columns: {', '.join(table.column_names)})")
        for index, text in enumerate(table.column(self.text_field).to_pylist()):
            if not isinstance(text, str):
                raise UserError(f"{path}: row {index}: field '{self.text_field}' is not a string")
            yield Document(text, f"{path}#{index}", {"source": "local", "path": str(path)})

    def _row(self, row, path: Path, index: int, unit: str = "line") -> Document:
        where = f"{path}:{index}" if unit == "line" else f"{path}: item {index}"
        if not isinstance(row, dict) or self.text_field not in row:
            raise UserError(f"{where}: missing text field '{self.text_field}'")
        if not isinstance(row[self.text_field], str):
            raise UserError(f"{where}: field '{self.text_field}' is not a string")
        return Document(row[self.text_field], f"{path}#{index}", {"source": "local", "path": str(path)})


def read_parquet(path: Path):
    """A .parquet file as a pyarrow Table, or a one-line error naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except pa.ArrowException as err:
        # pyarrow's message repeats the path ("Could not open Parquet input source '<path>': <reason>")
        reason = str(err).splitlines()[0].rpartition("': ")[2] if str(err) else type(err).__name__
        raise UserError(f"{path}: not a valid Parquet file ({reason})") from None


def read_utf8(path: Path) -> str:
    """A file's text (a byte-order mark tolerated), or a one-line error naming the file and line."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte offset {err.start})") from None


def json_records(path: Path, text: str):
    """(line or index, object, "line"/"item") for each record of a .jsonl or .json (list) file."""
    if path.suffix.lower() == ".jsonl":
        # split on "\n" only: str.splitlines() would also cut at U+2028 inside JSON strings
        for lineno, line in enumerate(text.split("\n"), 1):
            if line.strip():
                yield lineno, json_line(path, lineno, line), "line"
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: a .json input must hold a list of objects")
    escaped = SURROGATE_ESCAPE.search(text) is not None
    for index, row in enumerate(rows):
        if escaped:
            _refuse_lone_surrogates(row, f"{path}: item {index}")
        yield index, row, "item"


# only an escape in the D800-DFFF range can spell a surrogate: JSON written with ensure_ascii escapes every
# other non-ASCII character too, and those rows need no second pass
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(value, where: str) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800"), which json.loads keeps and no UTF-8 writer takes:
    dedup's hash or Arrow would fail on it with a traceback."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise UserError(f"{where}: text holds a lone UTF-16 surrogate ({err.object[err.start]!r} escaped in the "
                        "JSON), which is not a character; fix or drop the row") from None


def json_line(path: Path, lineno: int, line: str):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    if SURROGATE_ESCAPE.search(line):
        _refuse_lone_surrogates(row, f"{path}:{lineno}")
    return row


class HubReader(PipelineStep):
    """A Hub dataset, streamed, for online users (e.g. HuggingFaceFW/fineweb-edu, sample-10BT)."""

    name = "hub_reader"

    def __init__(self, dataset: str, config: str | None, split: str, text_field: str, max_docs: int | None) -> None:
        super().__init__()
        self.dataset, self.config, self.split = dataset, config, split
        self.text_field, self.max_docs = text_field, max_docs

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from datasets import load_dataset

        try:
            stream = load_dataset(self.dataset, self.config, split=self.split, streaming=True)
        except Exception as err:  # the Hub raises many types; the user needs one line
            raise UserError(f"could not open Hub dataset {self.dataset} ({type(err).__name__}: {err})") from None
        if world_size > 1:
            stream = stream.shard(num_shards=world_size, index=rank)
        for index, row in enumerate(stream):
            if self.max_docs and index >= self.max_docs:
                break
            if self.text_field not in row:
                raise UserError(f"{self.dataset}: row {index}: missing text field '{self.text_field}'")
            if not isinstance(row[self.text_field], str):
                raise UserError(f"{self.dataset}: row {index}: field '{self.text_field}' is not a string")
            self.stats["rows"] += 1
            yield Document(row[self.text_field], f"{self.dataset}#{index}", {"source": "hub", "dataset": self.dataset})


# ----------------------------------------------------------------------------- filters
_SPACES = re.compile(r"[ \t\f\v\u00a0]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFKC, Unix newlines, no trailing spaces on a line, at most one blank line in a row.

    Leading indentation is kept: it carries meaning in code.
    """
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub("", text)
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


class Normalizer(PipelineStep):
    name = "normalizer"

    def __init__(self, min_chars: int = 1) -> None:
        super().__init__()
        self.min_chars = min_chars

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            doc.text = normalize_text(doc.text)
            if len(doc.text) < self.min_chars:
                self.stats["dropped_short"] += 1
                continue
            self.stats["kept"] += 1
            yield doc


class ExactDedup(PipelineStep):
    """Drop documents whose normalised text was already seen (SHA-1 of the UTF-8 bytes)."""

    name = "exact_dedup"

    def run(self, data, rank: int = 0, world_size: int = 1):
        seen: set[bytes] = set()
        for doc in data:
            digest = hashlib.sha1(doc.text.encode("utf-8")).digest()
            if digest in seen:
                self.stats["duplicates"] += 1
                continue
            seen.add(digest)
            self.stats["kept"] += 1
            yield doc
