"""Documents in: the built-in demo set, the standard library's docstrings, or a user's files.

Every source yields the same `Document` list in a deterministic order, so the same
config always produces the same index (and the same embedding-cache key).
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import io
import json
import os
import sysconfig
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rag.config import CorpusConfig

DEMO_PATH = Path(__file__).resolve().parent.parent / "data" / "demo_corpus.jsonl"
# Folders of the standard library that hold tests or third-party code, not documentation.
STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
FOLDER_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str  # where it came from: a file path, or a module's file for stdlib


def load_corpus(cfg: CorpusConfig) -> list[Document]:
    """Load `cfg.source`, keep documents of at least `cfg.min_chars` characters, then the
    first `cfg.max_docs` of them (0 = all)."""
    docs = [d for d in _read_source(str(cfg.source)) if len(d.text) >= max(cfg.min_chars, 1)]
    if cfg.max_docs > 0:
        docs = docs[: cfg.max_docs]
    if not docs:
        raise ValueError(
            f"corpus {cfg.source!r} has no documents with at least {cfg.min_chars} characters"
        )
    _check_unique_ids(docs, str(cfg.source))
    return docs


def corpus_fingerprint(docs: Iterable[Document]) -> str:
    """A sha256 over ids and texts, length-prefixed so that no two corpora collide by
    shifting text between fields; the embedding cache is keyed on it."""
    digest = hashlib.sha256()
    for doc in docs:
        for field in (doc.id, doc.text):
            data = field.encode("utf-8")
            digest.update(f"{len(data)}:".encode())
            digest.update(data)
    return digest.hexdigest()


def _read_source(source: str) -> list[Document]:
    if source == "demo":
        return _read_jsonl(DEMO_PATH)
    if source == "stdlib":
        return list(_read_stdlib())
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if path.suffix == ".jsonl" and path.is_file():
        return _read_jsonl(path)
    if path.suffix == ".csv" and path.is_file():
        return _read_csv(path)
    raise ValueError(
        f"unknown corpus source {source!r}: expected 'demo', 'stdlib', "
        "or an existing .jsonl file, .csv file or folder of .txt/.md files"
    )


def _compose_text(title: str | None, text: str) -> str:
    """A title, when given, is prepended: it carries much of what a document is about."""
    text = text.strip()
    return f"{title.strip()}. {text}" if title and title.strip() else text


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from exc


def _read_jsonl(path: Path) -> list[Document]:
    """One JSON object per line with a string `text`; `id` defaults to the line number and
    an optional `title` is prepended."""
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {exc}") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string 'text' field")
        doc_id = str(record.get("id", lineno))
        docs.append(Document(doc_id, _compose_text(record.get("title"), record["text"]), str(path)))
    return docs


def _read_csv(path: Path) -> list[Document]:
    """A header row with a `text` column; `id` (default: the row number) and `title` are
    optional."""
    rows = csv.DictReader(io.StringIO(_read_text(path), newline=""))  # keeps quoted newlines
    if rows.fieldnames is None or "text" not in rows.fieldnames:
        raise ValueError(f"{path}:1: no 'text' column in header {rows.fieldnames}")
    docs = []
    for rowno, row in enumerate(rows, start=1):
        if row["text"] is None:
            raise ValueError(f"{path}:{rows.line_num}: row has no 'text' value")
        doc_id = row.get("id") or str(rowno)
        docs.append(Document(doc_id, _compose_text(row.get("title"), row["text"]), str(path)))
    return docs


def _read_folder(root: Path) -> list[Document]:
    """Every .txt and .md file below `root` (hidden ones skipped), id = relative path."""
    docs = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        hidden = any(part.startswith(".") for part in relative.parts)
        if path.suffix in FOLDER_SUFFIXES and path.is_file() and not hidden:
            docs.append(Document(relative.as_posix(), _read_text(path).strip(), str(path)))
    return docs


def _read_stdlib() -> Iterator[Document]:
    """Docstrings of the standard library, read with `ast`: importing the modules would run
    their side effects (`antigravity` opens a browser)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()  # a name defined per platform (`if sys.platform ...`) is kept once
    for path in _stdlib_files(root):
        relative = path.relative_to(root)
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes in old code
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (OSError, SyntaxError, ValueError):
            continue  # unreadable, or deliberately broken (lib2to3 fixtures and the like)
        for qualname, text in _docstrings(tree, ""):
            doc_id = ".".join(parts) + (f":{qualname}" if qualname else "")
            if doc_id not in seen:
                seen.add(doc_id)
                yield Document(doc_id, text, relative.as_posix())


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files)


def _docstrings(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) for a module or class and the classes and
    functions defined in it, including under `if`/`try`; function bodies are not entered."""
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        text = ast.get_docstring(node, clean=True)  # clean = inspect.cleandoc
        if text:
            yield prefix, text.strip()
        if not isinstance(node, ast.Module | ast.ClassDef):
            return
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _docstrings(child, f"{prefix}.{child.name}" if prefix else child.name)
        elif isinstance(child, ast.stmt):
            yield from _docstrings(child, prefix)


def _check_unique_ids(docs: list[Document], source: str) -> None:
    seen: set[str] = set()
    for doc in docs:
        if doc.id in seen:
            raise ValueError(f"corpus {source!r}: duplicate document id {doc.id!r}")
        seen.add(doc.id)


def main(argv: list[str] | None = None) -> None:
    """Print a corpus's size: `python -m rag.service.corpus stdlib --min-chars 80`."""
    from rag.config import CorpusConfig

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("source", help="demo | stdlib | a .jsonl, .csv or folder path")
    parser.add_argument("--min-chars", type=int, default=80)
    parser.add_argument("--max-docs", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = CorpusConfig(
        name=args.source, source=args.source, min_chars=args.min_chars, max_docs=args.max_docs
    )
    start = time.perf_counter()
    docs = load_corpus(cfg)
    seconds = time.perf_counter() - start
    chars = sum(len(d.text) for d in docs)
    print(f"{args.source}: {len(docs)} documents, {chars:,} characters, loaded in {seconds:.2f} s")


if __name__ == "__main__":
    main()
