"""Synthetic multi-hop generator: determinism, dedupe, held-out entities, answer checks, and
oracle trajectories that parse and match the retriever's real output."""

from __future__ import annotations

import json

import pytest

from megatron_recycle.agent.protocol import format_information, parse_action
from megatron_recycle.agent.retrievers import BM25Retriever
from megatron_recycle.data.corpus import load_corpus, load_wiki_articles
from megatron_recycle.data.datasets import read_qa_file
from megatron_recycle.data.synthetic import (
    SPLITS,
    TEMPLATES,
    Facts,
    _words,
    generate_dataset,
)

SIZES = {"n_train": 300, "n_dev": 60, "n_test": 120}
TOPK = 3


@pytest.fixture(scope="module")
def wiki():
    return load_corpus("wiki")


@pytest.fixture(scope="module")
def bm25(wiki, tmp_path_factory):
    return BM25Retriever(wiki, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def generated(bm25, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen0")
    result = generate_dataset(out, seed=0, topk=TOPK, retriever=bm25, progress=None, **SIZES)
    return out, result


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _contains(text: str, phrase: str) -> bool:
    return f" {_words(phrase)} " in f" {_words(text)} "


def test_facts_resolve_demonyms_and_birth_years():
    facts = Facts(load_wiki_articles())
    assert facts.by_demonym["American"].title == "United States"
    assert facts.by_demonym["Chinese"].title == "China"  # not Hong Kong or Macau
    assert facts.by_demonym["Dominican"].title == "Dominican Republic"  # not Dominica
    assert facts.people["Albert Einstein"].birth_year == 1879
    assert facts.people["Albert Einstein"].demonym is None  # "German-born" is not a nationality
    assert "Washington, D.C." in facts.by_demonym["American"].capitals
    assert len(facts.countries) > 150 and len(facts.people) > 1000 and len(facts.works) > 50


def test_facts_leave_out_what_has_no_single_answer():
    facts = Facts(load_wiki_articles())
    # year spans that are no life: a band, a dynasty, a war, a reign the extract repeats, several spans
    for title in ("Led Zeppelin", "The Beatles", "Ming dynasty", "Tang dynasty", "Seven Years' War",
                  "World War II", "Suleiman the Magnificent", "Puyi", "Eleanor of Aquitaine"):
        assert title not in facts.people, title
    assert facts.people["Mark Twain"].birth_year == 1835 and facts.people["Napoleon"].birth_year == 1769
    # two nationalities: no single capital to ask for
    assert facts.people["Billy Wilder"].demonym is None  # "Austrian and American filmmaker"
    assert facts.people["Mark Twain"].demonym == "American"
    countries = {c.name: c for c in facts.countries}
    # passages naming several capitals (seat of government, administrative, former, proclaimed)
    for name in ("Bolivia", "Malaysia", "Sri Lanka", "Eswatini", "Palestine", "Equatorial Guinea"):
        assert name not in countries, name
    assert countries["France"].capitals[0] == "Paris" and "United Kingdom" in countries
    # countries whose passage names both continents they straddle get no continent question
    for name in ("Russia", "Turkey", "Egypt", "Azerbaijan"):
        assert countries[name].continent is None, name
    assert countries["Spain"].continent == "Europe" and countries["Argentina"].continent == "South America"


def test_files_sizes_and_format(generated):
    out, result = generated
    counts = result["counts"]
    for split in SPLITS:
        rows = _read(out / f"{split}.jsonl")
        assert len(rows) == counts["written"][split] == SIZES[f"n_{split}"]
        assert sum(counts["per_template"][split].values()) == len(rows)
        for r in rows:
            assert set(r) == {"id", "question", "golden_answers", "metadata"}
            meta = r["metadata"]
            assert meta["source"] == "synthetic" and meta["template"] in TEMPLATES
            assert all(set(h) == {"title", "search"} for h in meta["hops"])
            assert len(meta["hops"]) == (1 if meta["template"] == "single_hop" else 2)
        # the project's own reader takes these files as they are
        examples = read_qa_file(out / f"{split}.jsonl")
        assert [e.id for e in examples] == [r["id"] for r in rows]
        assert all(e.source == "synthetic" for e in examples)
    assert set(counts["per_template"]["train"]) == set(TEMPLATES)  # every template yields
    assert json.loads((out / "stats.json").read_text())["written"] == counts["written"]


def test_no_duplicates_and_held_out_bridges(generated):
    out, _ = generated
    rows = {s: _read(out / f"{s}.jsonl") for s in SPLITS}
    questions = [_words(r["question"]) for s in SPLITS for r in rows[s]]
    assert len(questions) == len(set(questions))
    ids = [r["id"] for s in SPLITS for r in rows[s]]
    assert len(ids) == len(set(ids))
    bridges = {s: {b for r in rows[s] for b in r["metadata"]["bridge"]} for s in SPLITS}
    assert bridges["train"] and bridges["test"] and bridges["dev"]
    assert not bridges["train"] & bridges["test"]
    assert not bridges["train"] & bridges["dev"]
    assert not bridges["dev"] & bridges["test"]


def test_hops_in_corpus_and_answer_in_last_hop_passage(generated, wiki):
    out, _ = generated
    for split in SPLITS:
        for r in _read(out / f"{split}.jsonl"):
            hops = [wiki.find_title(h["title"]) for h in r["metadata"]["hops"]]
            assert all(p is not None for p in hops), r
            answer = r["golden_answers"][0]
            if r["metadata"]["template"] == "born_first":
                assert any(_contains(p.contents, answer) for p in hops), r
                assert r["question"].count(answer) == 1
            else:
                assert _contains(hops[-1].contents, answer), r
                assert not _contains(r["question"], answer), r


def test_oracle_trajectories_parse_and_match_the_retriever(generated, bm25):
    out, result = generated
    train = {r["id"]: r for r in _read(out / "train.jsonl")}
    sft = _read(out / "sft.jsonl")
    retrievable = [r for r in train.values() if r["metadata"]["oracle_retrievable"]]
    assert len(sft) == len(retrievable) == result["counts"]["sft"] > 0.8 * len(train)
    for row in sft:
        qa = train[row["id"]]
        assert row["question"] == qa["question"] and row["golden_answers"] == qa["golden_answers"]
        *searches, final = row["turns"]
        assert len(searches) == len(qa["metadata"]["hops"])
        for turn, hop in zip(searches, qa["metadata"]["hops"]):
            assert turn["generated"].startswith("<think>") and turn["generated"].endswith("</search>")
            assert parse_action(turn["generated"]) == ("search", hop["search"])
            passages = bm25.search([hop["search"]], TOPK)[0]
            assert turn["information"] == format_information(passages)
            assert hop["title"] in [p.title for p in passages]  # the needed passage is retrieved
        assert set(final) == {"generated"}
        assert parse_action(final["generated"]) == ("answer", qa["golden_answers"][0])


def test_deterministic_by_seed(generated, bm25, tmp_path):
    out0, _ = generated
    again = generate_dataset(tmp_path / "again", seed=0, topk=TOPK, retriever=bm25, progress=None, **SIZES)
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "sft.jsonl"):
        assert (out0 / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert again["counts"]["per_template"] == generated[1]["counts"]["per_template"]
    other = generate_dataset(tmp_path / "seed1", seed=1, topk=TOPK, retriever=bm25, progress=None, **SIZES)
    q0 = {r["question"] for r in _read(out0 / "test.jsonl")}
    q1 = {r["question"] for r in _read(other["paths"]["test"])}
    assert q0 != q1


def test_require_retrievable_and_template_subset(bm25, tmp_path, capsys):
    result = generate_dataset(
        tmp_path,
        seed=3,
        n_train=40,
        n_dev=10,
        n_test=10,
        topk=TOPK,
        templates=("capital_country_continent", "work_creator_birth_year"),
        retriever=bm25,
        require_retrievable=True,
        sft=False,
    )
    assert "[gen-data]" in capsys.readouterr().out
    rows = [r for s in SPLITS for r in _read(result["paths"][s])]
    assert rows and all(r["metadata"]["oracle_retrievable"] for r in rows)
    assert {r["metadata"]["template"] for r in rows} <= {
        "capital_country_continent",
        "work_creator_birth_year",
    }
    assert "sft" not in result["paths"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown templates"):
        generate_dataset("/nonexistent", templates=("who_is_taller",), progress=None)
    with pytest.raises(ValueError, match="split sizes"):
        generate_dataset("/nonexistent", n_train=0, n_dev=0, n_test=0, progress=None)


def test_generate_data_searches_through_the_configured_retriever(monkeypatch, tmp_path):
    """Oracle trajectories must show what rollouts will retrieve: a config with another retriever
    (dense, http, another corpus) hands that retriever to the generator; the default lets the
    generator build its BM25 over the packaged Wikipedia."""
    from megatron_recycle.config import load_config
    from megatron_recycle.data import synthetic
    from megatron_recycle.train import runtime as rtm

    got = {}
    monkeypatch.setattr(synthetic, "generate_dataset", lambda *a, **k: got.update(k) or {})
    sentinel = object()
    monkeypatch.setattr(rtm, "build_retriever_from_config", lambda cfg: sentinel)
    rtm.generate_data(load_config(None, [f"data.dir={tmp_path}"]))
    assert got["retriever"] is None
    for override in ("retriever.kind=dense", "retriever.kind=http", f"retriever.corpus={tmp_path / 'c.jsonl'}"):
        got.clear()
        rtm.generate_data(load_config(None, [f"data.dir={tmp_path}", override]))
        assert got["retriever"] is sentinel, override


class _QuotedTitles:
    """A retriever over the same corpus whose passages spell titles as wiki-18 does: ``"Paris"``."""

    def __init__(self, inner):
        self.inner = inner

    def search(self, queries, topk):
        from megatron_recycle.agent.types import Passage

        out = []
        for hits in self.inner.search(queries, topk):
            out.append([Passage(p.id, f'"{p.title}"\n{p.text}', p.score) for p in hits])
        return out


def test_hops_match_retrieved_titles_spelled_as_wiki18_does(generated, bm25, tmp_path):
    """wiki-18 (Search-R1's corpus, the GPU recipes' retriever) quotes its titles; matching them
    verbatim marked no question retrievable and wrote an empty sft.jsonl."""
    quoted = generate_dataset(tmp_path / "q", seed=0, topk=TOPK, retriever=_QuotedTitles(bm25), progress=None,
                              **SIZES)
    plain = generated[1]["counts"]
    assert quoted["counts"]["sft"] == plain["sft"] > 0.5 * SIZES["n_train"]
    assert quoted["counts"]["retrievable"] == plain["retrievable"]


def test_no_retrievable_train_question_is_an_error_before_anything_is_written(tmp_path):
    from megatron_recycle.data.synthetic import SyntheticDataError

    class Nothing:
        def search(self, queries, topk):
            return [[] for _ in queries]

    with pytest.raises(SyntheticDataError, match="none of the 30 train questions is retrievable"):
        generate_dataset(tmp_path / "n", n_train=30, n_dev=5, n_test=5, retriever=Nothing(), progress=None)
    assert not list((tmp_path / "n").glob("*"))
    # without SFT data the splits are written as asked
    result = generate_dataset(tmp_path / "n", n_train=30, n_dev=5, n_test=5, retriever=Nothing(), progress=None,
                              sft=False)
    assert result["counts"]["written"]["train"] == 30


def test_a_held_out_sft_set_never_holds_a_train_question(bm25, tmp_path, capsys):
    """The paper's SFT set is its own: before, sft.jsonl held oracle trajectories (with the gold
    answers) of the RL pool's own questions, which pushes their groups toward all-correct."""
    result = generate_dataset(tmp_path / "s", seed=0, topk=TOPK, retriever=bm25, n_sft=150, **SIZES)
    counts = result["counts"]
    assert counts["requested"]["sft"] == 150 and counts["sft_source"] == "held-out sft questions"
    rows = {s: _read(result["paths"][s]) for s in SPLITS}
    sft_rows = _read(result["paths"]["sft"])
    assert counts["sft"] == len(sft_rows) and 0.8 * 150 <= len(sft_rows) <= 150
    assert len(rows["train"]) == SIZES["n_train"]
    sft_questions = {r["question"] for r in sft_rows}
    assert len(sft_questions) == len(sft_rows)
    for split in SPLITS:
        assert not sft_questions & {r["question"] for r in rows[split]}, split
    # the templates dealt to both sets, as the RL pool has them
    assert len(counts["per_template"]["sft"]) >= 3, counts["per_template"]
    assert "SFT questions of their own" in capsys.readouterr().out
    # n_sft = 0: the train questions themselves, as before
    assert generate_dataset(tmp_path / "t", seed=0, topk=TOPK, retriever=bm25, progress=None,
                            **SIZES)["counts"]["sft_source"] == "train questions"


def test_an_interrupted_regeneration_never_leaves_a_mix_of_two_sets(generated, bm25, tmp_path, monkeypatch):
    """Files were replaced one by one: a kill after the new train split left the old dev/test ones
    beside it (questions shared between them) with the old stats.json, and the folder was used as
    it was. Now a kill either keeps the old set whole or leaves the folder marked unfinished, which
    ensure_data generates again."""
    import shutil
    from pathlib import Path

    from megatron_recycle.config import load_config
    from megatron_recycle.data import synthetic
    from megatron_recycle.train import runtime as rtm

    out0, _ = generated
    folder = tmp_path / "data"
    shutil.copytree(out0, folder)
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    moves = []
    real_replace = synthetic.os.replace

    def killed_after_first_move(src, dst):
        if Path(dst).parent == folder:  # the moves of the staged files into the folder
            if moves:
                raise KeyboardInterrupt  # (a kill: nothing after it runs)
            moves.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(synthetic.os, "replace", killed_after_first_move)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(folder, seed=1, topk=TOPK, retriever=bm25, progress=None, **SIZES)
    monkeypatch.undo()
    assert (folder / synthetic.INCOMPLETE_MARKER).exists() and not (folder / "stats.json").exists()
    assert (folder / "train.jsonl").read_bytes() != old["train.jsonl"]  # the new train split, the old others
    (folder / ".gen-data-stage-999999").mkdir()  # a generation killed while staging, under another pid
    (folder / ".gen-data-stage-999999" / "dev.jsonl").write_text("partial")
    cfg = load_config(None, [f"data.dir={folder}", "data.generate_if_missing=false"])
    with pytest.raises(FileNotFoundError, match="interrupted `megatron-recycle gen-data` left its files unfinished"):
        rtm.ensure_data(cfg)
    # allowed to generate: the whole set again (here with the recipe's settings, seed 0's files)
    monkeypatch.setattr(rtm, "generate_data", lambda cfg: generate_dataset(
        cfg.data.dir, seed=0, topk=TOPK, retriever=bm25, progress=None, **SIZES))
    rtm.ensure_data(load_config(None, [f"data.dir={folder}"]))
    assert not (folder / synthetic.INCOMPLETE_MARKER).exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(old)  # the staging folders are gone
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "sft.jsonl"):
        assert (folder / name).read_bytes() == old[name], name


def test_oracle_trajectories_show_only_topk_passages_from_a_server_that_returns_more(bm25, tmp_path):
    """A rollout shows the policy passages[:topk]; SFT must show it the same, whatever the server sends."""

    class Generous:
        def search(self, queries, topk):
            return bm25.search(queries, topk + 2)

    result = generate_dataset(tmp_path, seed=0, topk=TOPK, retriever=Generous(), progress=None,
                              n_train=60, n_dev=10, n_test=10)
    rows = _read(result["paths"]["sft"])
    assert rows
    for row in rows:
        for turn in row["turns"][:-1]:
            hop_query = parse_action(turn["generated"])[1]
            assert turn["information"] == format_information(bm25.search([hop_query], TOPK)[0])


def test_short_or_one_sided_splits_are_warned_about_and_the_cap_recorded(bm25, tmp_path):
    """At the GPU recipes' sizes the splits came out short (dev 303 of 500) and ~92% "who was born
    first": said only in one count line. Both are warnings now; max_share is recorded in stats.json."""
    said = []
    generate_dataset(tmp_path / "a", seed=3, n_train=60, n_dev=5, n_test=400, topk=TOPK,
                     templates=("capital_country_continent",), retriever=bm25, sft=False, progress=said.append)
    assert any(m.startswith("[gen-data] WARNING: test has ") and "of the 400 questions asked" in m for m in said)
    said.clear()
    result = generate_dataset(tmp_path / "b", seed=3, n_train=200, n_dev=5, n_test=5, topk=TOPK,
                              templates=("born_first", "capital_country_continent"), retriever=bm25, sft=False,
                              progress=said.append)
    assert any("WARNING: born_first makes" in m and "of train" in m for m in said), said
    assert json.loads((tmp_path / "b" / "stats.json").read_text())["max_share"] is None
    said.clear()
    capped = generate_dataset(tmp_path / "c", seed=3, n_train=200, n_dev=5, n_test=5, topk=TOPK, max_share=0.5,
                              templates=("born_first", "capital_country_continent"), retriever=bm25, sft=False,
                              progress=said.append)
    assert any("train has " in m and "under max_template_share 0.5" in m for m in said)  # the cap cost questions
    assert json.loads((tmp_path / "c" / "stats.json").read_text())["max_share"] == 0.5
    assert result["counts"]["written"]["train"] == 200
    # the cap holds on the split that came out, not on the size asked for
    train = capped["counts"]["per_template"]["train"]
    assert 0 < sum(train.values()) < 200 and max(train.values()) <= 0.5 * sum(train.values())


def test_the_template_cap_holds_on_train_and_the_sft_set_each(bm25, tmp_path):
    result = generate_dataset(tmp_path, seed=3, n_train=150, n_sft=100, n_dev=5, n_test=5, topk=TOPK, max_share=0.4,
                              retriever=bm25, progress=None)
    for split in ("train", "sft"):
        counts = result["counts"]["per_template"][split]
        assert sum(counts.values()) > 0 and max(counts.values()) <= 0.4 * sum(counts.values()), (split, counts)


def test_cap_shares_finds_the_largest_split_the_cap_allows():
    from megatron_recycle.data.synthetic import _cap_shares

    lists = {"plenty": list(range(1000)), "few": list(range(30)), "some": list(range(60))}
    capped = _cap_shares(lists, 500, 0.4)
    sizes = {k: len(v) for k, v in capped.items()}
    # T = 150: caps of 60 (plenty 60, few 30, some 60 = 150 >= 150); T = 151 would need 151 with caps of 60
    assert sizes == {"plenty": 60, "few": 30, "some": 60}
    assert _cap_shares({"a": [1, 2, 3]}, 10, 0.5) == {"a": []}  # one template cannot be half of anything
