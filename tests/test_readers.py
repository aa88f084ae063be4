"""Corpus readers: every format, and the messages for bad input."""

import json

import pytest

from ecoadapt.core.errors import UserError
from ecoadapt.data import readers


def texts(path, **kw):
    return [d.text for d in readers.read(str(path), **kw)]


def test_txt_is_one_document_per_line_and_skips_blank_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first doc\n\n   \nsecond doc\n")
    assert texts(p) == ["first doc", "second doc"]


def test_jsonl(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n')
    assert texts(p) == ["one", "two"]


def test_jsonl_bad_line_is_named(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "one"}\n{"text": broken\n')
    with pytest.raises(UserError, match=r"a\.jsonl:2: not valid JSON"):
        texts(p)


def test_missing_field_names_file_line_and_fields(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(UserError, match=r"a\.jsonl:2: no field 'text' \(fields: body\)"):
        texts(p)


def test_json_list(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"question": "what is this?"}, {"question": "color?"}]))
    assert texts(p, text_field="question") == ["what is this?", "color?"]


def test_coco_captions_pick_the_list_with_the_field(tmp_path):
    p = tmp_path / "captions.json"
    coco = {
        "info": {"year": 2019},
        "images": [{"id": 1, "file_name": "x.jpg"}],
        "annotations": [{"id": 5, "image_id": 1, "caption": "A tan couch."}, {"id": 6, "caption": "A lamp."}],
    }
    p.write_text(json.dumps(coco))
    assert texts(p, text_field="caption") == ["A tan couch.", "A lamp."]


def test_json_key_and_ambiguity(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"a": [{"text": "x"}], "b": [{"text": "y"}]}))
    with pytest.raises(UserError, match="several lists hold 'text'.*set data.json_key"):
        texts(p)
    assert texts(p, json_key="b") == ["y"]
    with pytest.raises(UserError, match="data.json_key 'c'"):
        texts(p, json_key="c")


@pytest.mark.parametrize(("suffix", "sep"), [(".csv", ","), (".tsv", "\t")])
def test_tables(tmp_path, suffix, sep):
    p = tmp_path / f"a{suffix}"
    p.write_text(f"id{sep}body\n1{sep}hello there\n2{sep}\n3{sep}general kenobi\n")
    assert texts(p, text_field="body") == ["hello there", "general kenobi"]
    with pytest.raises(UserError, match=rf"a\{suffix}:1: no column 'text' \(columns: id, body\)"):
        texts(p)


def test_not_utf8_names_line(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"fine\nstill fine\nbad \xff byte\n")
    with pytest.raises(UserError, match=r"a\.txt:3: not UTF-8"):
        texts(p)


def test_resolve_globs_and_errors(tmp_path):
    (tmp_path / "b.txt").write_text("x\n")
    (tmp_path / "a.txt").write_text("y\n")
    (tmp_path / "c.bin").write_text("z\n")
    assert readers.resolve([str(tmp_path / "*.txt")]) == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    assert readers.resolve(["a.txt"], base=tmp_path) == [str(tmp_path / "a.txt")]
    with pytest.raises(UserError, match="matches no file"):
        readers.resolve([str(tmp_path / "nope*.txt")])
    with pytest.raises(UserError, match="unknown corpus type '.bin'"):
        readers.resolve([str(tmp_path / "c.bin")])
    with pytest.raises(UserError, match="unknown builtin .nope."):
        readers.resolve(["builtin:nope"])


def test_empty_corpus(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    from ecoadapt.config import DataConfig
    from ecoadapt.data import corpus

    p = tmp_path / "a.txt"
    p.write_text("\n\n")
    with pytest.raises(UserError, match="holds no text"):
        corpus.build(DataConfig(train=[str(p)]), AutoTokenizer.from_pretrained(tiny_llama), "clm")


def test_builtin_python_docstrings_is_real_text():
    docs = []
    for doc in readers.read("builtin:python-docstrings"):
        docs.append(doc.text)
        if len(docs) == 200:
            break
    assert len(docs) == 200
    assert all(len(d) >= 40 and "\n" not in d for d in docs)


def test_a_long_line_is_read_in_pieces_cut_at_whitespace_sharing_its_split(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "PIECE_CHARS", 64)
    long_line = " ".join(f"wörd{i}" for i in range(60))  # multi-byte characters across piece ends
    path = tmp_path / "c.txt"
    path.write_text(f"short one\n{long_line}\nlast line without a newline", encoding="utf-8")
    docs = list(readers.read(str(path)))
    assert docs[0].text == "short one" and docs[0].key == "short one" and docs[0].piece == 0
    pieces = [d for d in docs if d.source.endswith(":2")]
    assert len(pieces) > 3 and " ".join(p.text for p in pieces) == long_line  # nothing lost, no word cut
    assert all(len(p.text.encode()) <= 64 for p in pieces)
    assert {p.key for p in pieces} == {pieces[0].text} and [p.piece for p in pieces] == list(range(len(pieces)))
    assert docs[-1].text == "last line without a newline" and docs[-1].piece == 0  # not taken for a piece


def test_a_long_record_is_cut_into_pieces_before_the_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "PIECE_CHARS", 50)
    text = "x" * 120 + " " + "y" * 10  # no whitespace for a while: cut hard where there is none
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    pieces = list(readers.read(str(path)))
    assert "".join(p.text for p in pieces).replace(" ", "") == text.replace(" ", "")
    assert all(len(p.text) <= 50 for p in pieces) and len({p.key for p in pieces}) == 1
