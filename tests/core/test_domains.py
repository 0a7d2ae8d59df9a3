"""Reference domains: each schema loads, the split is seeded and disjoint, bad input names its place."""
import json
import logging

import pytest

from domino.core.batching import tokenize_texts
from domino.core.domains import load_domain, load_records, reference_fingerprint
from domino.core.records import JsonlAppender, RecordError, read_jsonl
from domino.training.datamodule import DomainDataModule

from ..conftest import FIXTURES


def test_humaneval_split_is_seeded_and_disjoint():
    refs, held = load_domain(source="humaneval", text_field="prompt", id_field="task_id", n_references=40,
                             split_seed=0)
    assert len(refs) == 40 and len(held) == 124
    assert not {r["id"] for r in refs} & {h["id"] for h in held}
    assert all(r["text"] == r["prompt"] and "canonical_solution" in r for r in refs)
    again, _ = load_domain(source="humaneval", text_field="prompt", id_field="task_id", n_references=40,
                           split_seed=0)
    other, _ = load_domain(source="humaneval", text_field="prompt", id_field="task_id", n_references=40,
                           split_seed=1)
    assert reference_fingerprint(again) == reference_fingerprint(refs) != reference_fingerprint(other)


def test_codecontests_and_livecodebench_schemas(compose):
    for name, n, field in (("codecontests", 4, "description"), ("livecodebench", 3, "question_content")):
        cfg = compose("train", [f"domain={name}", f"domain.path={FIXTURES / (name + '.jsonl')}",
                                "domain.n_references=2", "domain.n_heldout=null"])
        refs, held = load_domain(**cfg.domain)
        assert len(refs) == 2 and len(held) == n - 2
        assert all(r["text"] == r[field] for r in refs + held)


def test_jsonl_template_and_parquet(tmp_path):
    recs = load_records(path=str(FIXTURES / "generic.jsonl"), template="{title}\n\n{body}", id_field="id")
    assert recs[0]["text"].startswith("Recipe 0\n\nMix 0 cups") and recs[0]["id"] == "r0"
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(read_jsonl(FIXTURES / "generic.jsonl")), tmp_path / "g.parquet")
    assert [r["text"] for r in load_records(path=str(tmp_path / "g.parquet"), text_field="body")] == \
        [r["body"] for r in read_jsonl(FIXTURES / "generic.jsonl")]


def test_missing_file_is_named():
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(path="./nope.jsonl")


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "refs.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(RecordError, match=r"refs.jsonl:3: malformed JSON \(Expecting ',' delimiter at column 13\)"):
        load_records(path=str(f))
    f.write_text('{"text": "a"}\n    {"text": "a", bad}\n')  # leading spaces count: the column is the file's
    with pytest.raises(RecordError, match=r"refs.jsonl:2: malformed JSON \(.* at column 19\)"):
        load_records(path=str(f))
    j = tmp_path / "refs.json"
    j.write_text('[{"text": "a"},\n {"text": "b",, }]')
    with pytest.raises(RecordError, match=r"refs.json:2: malformed JSON \(.* at column 15\)"):
        load_records(path=str(j))


def test_missing_field_names_line_and_key(tmp_path):
    f = tmp_path / "refs.jsonl"
    f.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(RecordError, match=r"refs.jsonl:2: missing field 'text' \(domain.text_field\)"):
        load_records(path=str(f))
    with pytest.raises(RecordError, match=r"refs.jsonl:1: missing field\(s\) \['title'\]"):
        load_records(path=str(f), template="{title}: {text}")


def test_empty_set_and_empty_text(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(RecordError, match="empty reference set"):
        load_records(path=str(f))
    f.write_text('{"text": "   "}\n')
    with pytest.raises(RecordError, match="empty.jsonl:1: empty text"):
        load_records(path=str(f))


def test_duplicate_ids_are_refused(tmp_path):
    f = tmp_path / "dup.jsonl"
    f.write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    with pytest.raises(RecordError, match="dup.jsonl:2: duplicate id '1'"):
        load_records(path=str(f), id_field="id")


def test_truncation_warns_once_with_count(tiny_backbone, caplog):
    tok = tiny_backbone.tokenizer
    texts = ["word " * 100, "short", "word " * 50]
    with caplog.at_level(logging.WARNING):
        ids = tokenize_texts(tok, texts, max_len=20, what="references")
    msgs = [r.message for r in caplog.records if "truncated" in r.message]
    assert msgs == ["2 of 3 references are longer than max_len=20 tokens and were truncated"]
    assert [len(i) for i in ids][0] == 20 and ids[1][-1] == tok.eos_token_id


def test_batches_never_hold_a_single_reference(tiny_backbone):
    texts = [f"example {i}" for i in range(9)]  # 9 = 2*4 + 1: the last batch would be size 1
    dm = DomainDataModule(tiny_backbone.tokenizer, texts, batch_size=4)
    sizes = [len(b["index"]) for b in dm.train_dataloader()]
    assert sizes == [4, 4]
    dm = DomainDataModule(tiny_backbone.tokenizer, texts[:7], batch_size=4)  # last batch of 3 is kept
    assert sorted(len(b["index"]) for b in dm.train_dataloader()) == [3, 4]
    with pytest.raises(ValueError, match="batch_size=1"):
        DomainDataModule(tiny_backbone.tokenizer, texts, batch_size=1)


def test_appender_survives_a_torn_line(tmp_path):
    f = tmp_path / "out.jsonl"
    with JsonlAppender(f) as w:
        w.write({"id": 1})
    with open(f, "a") as fh:
        fh.write('{"id": 2, "te')  # a crash mid-write
    with JsonlAppender(f) as w:
        w.write({"id": 3})
    assert [json.loads(x)["id"] for x in f.read_text().splitlines()] == [1, 3]
