"""Prompt sets: the built-in data, and user data in the other supported shapes."""

from __future__ import annotations

import collections
import json
import re

import pytest

from cascade.config import ConfigError, DataSource
from cascade.prompts import load_prompts, read_text


def test_builtin_data_covers_the_five_axioms_with_heldout_splits():
    probes = load_prompts(DataSource(path="builtin:ethics_probes.jsonl"))
    lessons = load_prompts(DataSource(path="builtin:composure_lessons.jsonl"))
    assert len(probes) == 80 and len(lessons) == 40
    assert len({p.id for p in probes}) == 80 and len({p.id for p in lessons}) == 40
    axioms = collections.Counter(p.id.split("-")[1] for p in probes)
    assert axioms == {"pi": 16, "sv": 16, "ia": 16, "isr": 16, "bi": 16}  # and two held out of each
    assert collections.Counter(p.id.split("-")[1] for p in probes if p.heldout) == {
        a: 2 for a in axioms
    }
    for ps in (probes, lessons):
        held = [p for p in ps if p.heldout]
        assert 0 < len(held) < len(ps) and all(p.reference for p in ps)
    kernel = read_text("builtin:kernel.md")
    for name in ("Prime-Imperative", "Self-Validation", "Intent-Alignment",
                 "Inter-Substrate-Respect", "Benevolent-Intervention"):
        assert name in kernel


def test_parquet_with_column_mapping_and_hash_heldout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": [f"question {i}?" for i in range(200)]}), path)
    src = DataSource(path=str(path), prompt_column="question", id_column=None, heldout_column=None,
                     heldout_fraction=0.2)
    ps = load_prompts(src)
    assert len(ps) == 200 and ps[0].messages == [{"role": "user", "content": "question 0?"}]
    assert 20 < sum(p.heldout for p in ps) < 60
    assert [p.id for p in ps] == [p.id for p in load_prompts(src)]  # stable ids, stable split


def test_chat_messages_drop_the_final_assistant_turn(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"id": "a",
             "messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "old"}]},
            {"id": "b",
             "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                     {"role": "user", "content": "z"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ps = load_prompts(DataSource(path=str(path), prompt_column=None, messages_column="messages"))
    assert ps[0].messages == [{"role": "user", "content": "hi"}]
    assert len(ps[1].messages) == 3


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', ":2: duplicate id 'a' (first at"),
    ('{"id": "a", "prompt": "  "}\n', ":1: empty prompt"),
    ('[1, 2]\n', ":1: expected a JSON object, got list"),
])
def test_bad_rows_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_prompts(DataSource(path=str(path)))


def test_unknown_hub_dataset_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="cannot load data 'no-such-org/no-such-data'"):
        load_prompts(DataSource(path="no-such-org/no-such-data"))


def test_curation_counts_every_drop(tmp_path):
    """Failed, empty, truncated, too long, exact and normalised duplicates: each counted, none kept.
    """
    from cascade.config import compose
    from cascade.graph import GenJob, PhaseGraph, StageGraph, Teacher
    from cascade.prompts import Prompt
    from cascade.rundir import RunDir, Step
    from stages import curate

    cfg = compose(["+stage=4b", "models=tiny", "generation.max_chars=40"])
    rd = RunDir(str(tmp_path / "run"))
    t = Teacher("1b", "m", "k")
    job = GenJob(t, "ethics",
                 Step("generate/1b/ethics", "key", rd.generation("1b", "ethics", "key")), 8)
    texts = [("A fine answer.", "stop"), ("A fine answer.", "stop"), ("a FINE answer", "stop"),
             ("   ", "stop"),
             ("cut off", "length"), ("boom", "error"), ("x" * 41, "stop"),
             ("Another answer.", "stop")]
    recs = [{"prompt_id": "p1", "sample": i, "text": x, "finish_reason": f, "data": "ethics",
             "teacher": "1b",
             "teacher_key": "k", "sampling": {}, "seed": 1, "prompt_tokens": 3,
             "completion_tokens": 4}
            for i, (x, f) in enumerate(texts)]
    rd.write_jsonl(rd.shard("1b", "ethics", "key", 0), recs)
    sp = StageGraph("4b", "m", "k", None, [t], [job])
    ph = PhaseGraph(0, "p0_ethics", "ethics", 1, 1e-3,
                    Step("4b/dataset/p0_ethics", "d", rd.dataset("4b", "p0_ethics")),
                   Step("4b/train/p0_ethics", "t", rd.model("4b", 0, "p0_ethics")))
    staging = rd.staging("ds")
    summary = curate.build(staging, cfg, sp, ph, [Prompt("p1", [{"role": "user", "content": "q"}])],
                           rd)
    assert summary["counts"] == {"generated": 8, "kept": 2, "teacher/1b": 2, "duplicate_exact": 1,
                                 "duplicate_normalized": 1, "empty": 1, "truncated": 1, "failed": 1,
                                 "too_long": 1}
    kept = [json.loads(x)["response"] for x in open(f"{staging}/train.jsonl")]
    assert kept == ["A fine answer.", "Another answer."]


def test_rouge_l_is_the_longest_common_subsequence_f1():
    from cascade.metrics import rouge_l

    assert rouge_l("Stay with them today", "stay with them") == 2 * 3 / (4 + 3)
    assert rouge_l("a b c d", "d c b a") == 2 * 1 / 8  # order matters: one word in sequence
    assert rouge_l("", "x") == 0.0 and rouge_l("same words", "Same words") == 1.0
