"""The packaged Wikipedia corpus and user jsonl corpora load with unique, stable ids."""

from __future__ import annotations

import json

import pytest

from megatron_recycle.data.corpus import (
    WIKI_ATTRIBUTION,
    WIKI_EXPECTED_PASSAGES,
    Corpus,
    load_corpus,
    load_jsonl_corpus,
    wiki_id,
)


@pytest.fixture(scope="module")
def wiki():
    return load_corpus("wiki")


def test_wiki_corpus_has_all_passages_with_unique_stable_ids(wiki):
    assert len(wiki) == WIKI_EXPECTED_PASSAGES == 10_033
    assert len(set(wiki.ids)) == len(wiki)
    einstein = wiki.find_title("Albert Einstein")
    assert einstein is not None and einstein.id == wiki_id("Albert Einstein")
    # ids depend on the title only, so they survive a reload and any change of row order
    assert load_corpus("wiki").get(einstein.id).contents == einstein.contents
    assert wiki_id("Albert Einstein") == "wiki-7303d2c9c8d9"


def test_wiki_passage_layout(wiki):
    p = wiki.find_title("Albert Einstein")
    assert p.contents.startswith("Albert Einstein\nAlbert Einstein (German-born theoretical physicist")
    assert p.text.startswith("Albert Einstein (") and "theory of relativity" in p.text
    assert all(c.count("\n") == 1 for c in wiki.contents)  # "title\ntext", text on one line
    assert "CC BY-SA 4.0" in WIKI_ATTRIBUTION and "Wikipedia" in WIKI_ATTRIBUTION


def test_fingerprint_changes_with_content(wiki):
    a = wiki.subset([0, 1, 2])
    b = Corpus(list(a.ids), [a.contents[0] + "!", *a.contents[1:]])
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == wiki.subset([0, 1, 2]).fingerprint()


def test_jsonl_corpus_roundtrip_and_errors(wiki, tmp_path):
    path = wiki.subset([5, 6, 7]).to_jsonl(tmp_path / "c.jsonl")
    back = load_corpus(path)
    assert back.ids == [wiki.ids[i] for i in (5, 6, 7)]
    assert back.contents == [wiki.contents[i] for i in (5, 6, 7)]

    no_ids = tmp_path / "wiki18.jsonl"
    no_ids.write_text("\n".join(json.dumps({"contents": f'"T{i}"\ntext {i}'}) for i in range(3)) + "\n")
    assert load_jsonl_corpus(no_ids).ids == ["0", "1", "2"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "contents": "a\\nb"}\n{"id": "2", "text": "no contents"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*contents"):
        load_jsonl_corpus(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "1", "contents": "a\\nb"}\n{"id": "1", "contents": "c\\nd"}\n')
    with pytest.raises(ValueError, match="appears twice"):
        load_jsonl_corpus(dup)
    with pytest.raises(FileNotFoundError, match="neither 'wiki'"):
        load_corpus(tmp_path / "missing.jsonl")


def test_jsonl_corpus_gzip_bom_ids_and_untitled_rows(tmp_path, caplog):
    import gzip

    rows = [{"id": 10, "contents": "T\ntext"}, {"id": "b", "contents": "one line, no title"}]
    lines = "\n".join(json.dumps(r) for r in rows) + "\n"
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    (tmp_path / "bom.jsonl").write_text("\ufeff" + lines, encoding="utf-8")
    with caplog.at_level("WARNING"):
        for name in ("c.jsonl.gz", "bom.jsonl"):
            corpus = load_corpus(tmp_path / name)
            assert corpus.ids == ["10", "b"] and corpus.contents == [r["contents"] for r in rows]
    assert corpus.name == "bom" and load_corpus(tmp_path / "c.jsonl.gz").name == "c"
    assert "1 of 2 passages have no title line" in caplog.text
    bad_id = tmp_path / "null.jsonl"
    bad_id.write_text('{"id": null, "contents": "a\\nb"}\n')
    with pytest.raises(ValueError, match=r"null.jsonl:1: 'id' must be a string or an integer, got None"):
        load_jsonl_corpus(bad_id)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_corpus(tmp_path)
