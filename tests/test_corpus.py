"""Corpus loaders: every source, the filters, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from rag.config import CorpusConfig
from rag.service.corpus import Document, corpus_fingerprint, load_corpus


def cfg(source: object, min_chars: int = 0, max_docs: int = 0) -> CorpusConfig:
    return CorpusConfig(name="test", source=str(source), min_chars=min_chars, max_docs=max_docs)


def test_demo_corpus_is_deterministic_and_covers_the_hover_question():
    docs = load_corpus(cfg("demo"))
    assert 40 <= len(docs) <= 80
    assert docs == load_corpus(cfg("demo"))
    ids = [d.id for d in docs]
    assert len(set(ids)) == len(ids)
    assert any("hummingbird" in i for i in ids)
    assert all(d.text and d.source.endswith("demo_corpus.jsonl") for d in docs)
    hummingbird = next(d for d in docs if "hummingbird" in d.id)
    assert hummingbird.text.startswith("Hummingbirds hover in the air. ")  # title prepended


def test_jsonl_ids_titles_and_blank_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [
        {"id": "a", "text": "  first text  "},
        {"text": "no id here"},
        {"id": 7, "title": "Seven", "text": "numbered"},
    ]
    path.write_text("\n".join([json.dumps(lines[0]), "", *map(json.dumps, lines[1:])]) + "\n")
    docs = load_corpus(cfg(path))
    assert docs == [
        Document("a", "first text", str(path)),
        Document("3", "no id here", str(path)),  # default id: the line number
        Document("7", "Seven. numbered", str(path)),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "x"}', "string 'text' field"),
        ('{"text": 3}', "string 'text' field"),
        ('["text"]', "string 'text' field"),
        ("{not json", "invalid JSON"),
    ],
)
def test_jsonl_errors_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{message}"):
        load_corpus(cfg(path))


def test_csv_with_and_without_ids(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text('id,title,text\nq1,,"multi\nline, text"\n,T,second\n')
    assert load_corpus(cfg(path)) == [
        Document("q1", "multi\nline, text", str(path)),
        Document("2", "T. second", str(path)),
    ]
    only_text = tmp_path / "plain.csv"
    only_text.write_text("text\nalpha\nbeta\n")
    assert [(d.id, d.text) for d in load_corpus(cfg(only_text))] == [("1", "alpha"), ("2", "beta")]


def test_csv_errors(tmp_path):
    no_column = tmp_path / "nocol.csv"
    no_column.write_text("id,body\n1,hello\n")
    with pytest.raises(ValueError, match=r"nocol\.csv:1: no 'text' column"):
        load_corpus(cfg(no_column))
    short_row = tmp_path / "short.csv"
    short_row.write_text("id,text\n1,hello\n2\n")
    with pytest.raises(ValueError, match=r"short\.csv:3: row has no 'text' value"):
        load_corpus(cfg(short_row))


def test_folder_reads_txt_and_md_recursively_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.md").write_text("# B\nbee")
    (tmp_path / "a.txt").write_text("ay\n")
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "skip.py").write_text("print('not a document')")
    (tmp_path / ".hidden" / "d.txt").write_text("hidden")
    docs = load_corpus(cfg(tmp_path))
    assert [(d.id, d.text) for d in docs] == [
        ("a.txt", "ay"),
        ("b.md", "# B\nbee"),
        ("sub/c.txt", "sea"),
    ]
    assert docs[2].source == str(tmp_path / "sub" / "c.txt")


def test_unreadable_file_is_a_clear_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: cannot read"):
        load_corpus(cfg(tmp_path))


def test_min_chars_and_max_docs(tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = ["short", "a somewhat longer text", "another long enough text", "   "]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert [d.id for d in load_corpus(cfg(path))] == ["1", "2", "3"]  # blank text dropped
    assert [d.id for d in load_corpus(cfg(path, min_chars=10))] == ["2", "3"]
    assert [d.id for d in load_corpus(cfg(path, min_chars=10, max_docs=1))] == ["2"]


def test_empty_corpus_unknown_source_and_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match="no documents"):
        load_corpus(cfg(tmp_path))  # an empty folder
    with pytest.raises(ValueError, match="no documents with at least 1000"):
        load_corpus(cfg("demo", min_chars=1000))
    with pytest.raises(ValueError, match="unknown corpus source 'nonsense'"):
        load_corpus(cfg("nonsense"))
    parquet = tmp_path / "docs.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="unknown corpus source"):
        load_corpus(cfg(parquet))
    dupes = tmp_path / "dupes.jsonl"
    dupes.write_text('{"id": "x", "text": "one"}\n{"id": "x", "text": "two"}\n')
    with pytest.raises(ValueError, match="duplicate document id 'x'"):
        load_corpus(cfg(dupes))


def test_fingerprint_covers_ids_and_texts_unambiguously():
    docs = [Document("a", "bc", "s"), Document("d", "e", "s")]
    assert corpus_fingerprint(docs) == corpus_fingerprint(list(docs))
    assert corpus_fingerprint(docs) != corpus_fingerprint([Document("ab", "c", "s"), docs[1]])
    assert corpus_fingerprint(docs) != corpus_fingerprint(docs[::-1])
    assert corpus_fingerprint(docs) == corpus_fingerprint(
        [Document("a", "bc", "elsewhere"), docs[1]]
    )


STDLIB_PROBE = textwrap.dedent(
    """
    import json, sys, time
    from rag.config import CorpusConfig
    from rag.service.corpus import load_corpus
    start = time.perf_counter()
    docs = load_corpus(CorpusConfig(name="stdlib", source="stdlib", min_chars=80))
    print(json.dumps({
        "seconds": time.perf_counter() - start,
        "ids": [d.id for d in docs],
        "sources": sorted({d.source for d in docs}),
        "chars": sum(len(d.text) for d in docs),
        "min_len": min(len(d.text) for d in docs),
        "imported": sorted({"antigravity", "this", "tkinter", "idlelib"} & set(sys.modules)),
    }))
    """
)


@pytest.fixture(scope="module")
def stdlib_probe() -> dict:
    """The stdlib corpus loaded in a fresh interpreter, so sys.modules shows what it imported."""
    result = subprocess.run(
        [sys.executable, "-c", STDLIB_PROBE],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(result.stdout)


def test_stdlib_corpus_size_and_speed(stdlib_probe):
    ids = stdlib_probe["ids"]
    assert 3_000 <= len(ids) <= 7_000
    assert 1_000_000 <= stdlib_probe["chars"] <= 2_500_000
    assert stdlib_probe["min_len"] >= 80
    assert len(set(ids)) == len(ids)
    assert stdlib_probe["seconds"] < 15


def test_stdlib_corpus_ids_and_skipped_folders(stdlib_probe):
    ids = set(stdlib_probe["ids"])
    assert {"json", "json.decoder:JSONDecoder.decode", "collections:namedtuple"} <= ids
    assert not any(i.startswith(("test.", "idlelib.idle_test", "lib2to3.tests")) for i in ids)
    sources = stdlib_probe["sources"]
    assert "json/decoder.py" in sources
    assert not any(part in s for s in sources for part in ("site-packages", "/test/", "/tests/"))


def test_stdlib_corpus_never_imports_the_modules(stdlib_probe):
    assert stdlib_probe["imported"] == []
