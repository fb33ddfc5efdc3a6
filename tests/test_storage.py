"""Atomic files and folders, the one writer of every CSV and JSON file, and the one cache
root (with `~` expanded) every cache uses."""

from __future__ import annotations

import ast
import csv
import json
import threading
from pathlib import Path

import platformdirs
import pytest

from rag.config import compose
from rag.service.corpus import load_corpus
from rag.service.index import DocumentIndex
from rag.service.models import cache_root, load_embedder
from rag.storage import cache_dir, publishing, write_atomically, write_csv, write_json

REPO = Path(__file__).resolve().parent.parent


def test_write_atomically_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "deep" / "port"
    write_atomically(target, "8000\n")
    write_atomically(target, b"8001\n")
    assert target.read_text() == "8001\n"
    assert [p.name for p in target.parent.iterdir()] == ["port"]


def test_a_reader_sees_the_old_file_or_the_whole_new_one(tmp_path):
    target = tmp_path / "vectors"
    versions = [bytes([n]) * 2_000_000 for n in range(1, 4)]
    write_atomically(target, versions[0])
    seen: set[bytes] = set()
    done = threading.Event()

    def read_until_done() -> None:
        while not done.is_set():
            seen.add(target.read_bytes())

    reader = threading.Thread(target=read_until_done)
    reader.start()
    for n in range(30):
        write_atomically(target, versions[n % 3])
    done.set()
    reader.join()
    assert seen <= set(versions)


def test_a_failed_write_keeps_the_old_file_and_removes_its_staging(tmp_path):
    target = tmp_path / "port"
    write_atomically(target, "old")
    with pytest.raises(TypeError):
        write_atomically(target, 8000)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["port"]


def test_csv_rows_with_missing_values_and_none_are_empty_cells(tmp_path):
    target = tmp_path / "runs" / "summary.csv"
    write_csv(target, [{"a": 1, "b": None}, {"a": "x,y"}], ["a", "b"])
    assert target.read_text() == 'a,b\n1,\n"x,y",\n'
    assert list(csv.DictReader(target.open())) == [{"a": "1", "b": ""}, {"a": "x,y", "b": ""}]
    assert [p.name for p in target.parent.iterdir()] == ["summary.csv"]


def test_json_holds_what_json_cannot_as_its_string(tmp_path):
    target = tmp_path / "meta.json"
    write_json(target, {"folder": tmp_path, "n": 2})
    assert json.loads(target.read_text()) == {"folder": str(tmp_path), "n": 2}


def writes_outside_storage(path: Path) -> list[str]:
    """Calls in a module that write a file other than through rag.storage: `write_text`,
    `write_bytes`, `os.replace`/`os.rename`, an `open` for writing (appending to a log is
    not a result file)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        on_os = isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "os"
        arguments = [*node.args[:2], *(k.value for k in node.keywords if k.arg == "mode")]
        modes = [
            a.value for a in arguments if isinstance(a, ast.Constant) and isinstance(a.value, str)
        ]
        for_writing = any(set(m) <= set("wxbt+") and set(m) & set("wx") for m in modes)
        if (
            name in ("write_text", "write_bytes")
            or (on_os and name in ("replace", "rename"))
            or (name == "open" and for_writing)
        ):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    return found


def test_every_file_the_package_writes_goes_through_the_one_atomic_writer():
    modules = [*(REPO / "rag").rglob("*.py"), *(REPO / "hydra_plugins").rglob("*.py")]
    found = [hit for m in modules if m.name != "storage.py" for hit in writes_outside_storage(m)]
    assert found == []


def test_publishing_a_folder_is_all_or_nothing(tmp_path):
    target = tmp_path / "models" / "cache-entry"
    with pytest.raises(RuntimeError), publishing(target) as staging:
        (staging / "weights").write_text("half")
        raise RuntimeError("died while writing")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    with publishing(target) as staging:
        (staging / "weights").write_text("whole")
    assert (target / "weights").read_text() == "whole"
    assert [p.name for p in target.parent.iterdir()] == ["cache-entry"]


def test_publishing_yields_to_a_folder_another_process_published_first(tmp_path):
    target = tmp_path / "entry"
    with publishing(target) as staging:
        (staging / "weights").write_text("ours")
        target.mkdir()  # another process finished first
        (target / "weights").write_text("theirs")
    assert (target / "weights").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_cache_dir_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir("~/ragcache") == tmp_path / "ragcache"
    assert cache_dir("") == Path(platformdirs.user_cache_dir("ragbench"))
    # Hydra's override grammar wants a value starting with `~` quoted.
    model = compose(["model=tiny", "model.cache_dir='~/ragcache'"]).model
    assert cache_root(model) == tmp_path / "ragcache" / "models"


def test_the_embedding_cache_goes_under_an_expanded_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = compose(["model=tiny", "corpus.cache_dir='~/ragcache'"])
    DocumentIndex(load_corpus(cfg.corpus), load_embedder(cfg.model), cfg.corpus)
    assert len(list((tmp_path / "home" / "ragcache" / "embeddings").glob("*.npy"))) == 1
    assert not (tmp_path / "~").exists()
