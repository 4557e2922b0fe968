"""A stopped scoring run continues with --resume: the journal of scored batches (pure logic, mocked scorer)."""

from __future__ import annotations

import pytest

from recsft import evaluation, inference
from recsft.io import DataError
from recsft.resume import SCORE_JOURNAL, ScoreJournal, open_score_journal, score_header


class Stop(Exception):
    pass


def block_records(n: int) -> list[dict]:
    return [{"user_id": u, "prefix": f"user {u}", "blocks": [
        {"candidate_movie_id": 10 * u + j, "candidate_title": f"m{u}{j}", "answer": "Yes" if (u + j) % 2 else "No"}
        for j in range(1 + u % 3)]} for u in range(n)]


@pytest.fixture
def fake_scorer(monkeypatch):
    """score_blocks replaced by a deterministic function of the candidate; records every call's records."""
    calls = []

    def score_blocks(model, tok, records, *args, **kwargs):
        calls.append([r["user_id"] for r in records])
        return [{"p_yes": (b["candidate_movie_id"] % 7) / 7, "logit_yes": 0.1 * b["candidate_movie_id"],
                 "logit_no": 0.0, "answer": "Yes", "top_token": "Yes"} for r in records for b in r["blocks"]]

    monkeypatch.setattr(inference, "score_blocks", score_blocks)
    return calls


class StopsAfterTwoBatches(ScoreJournal):
    def add(self, *batch):
        super().add(*batch)
        if self.records == 4:
            raise Stop  # the run is killed while its third batch is scored


HEADER = {"model": "lora", "records": "abc", "mode": "score"}


def journal_path(folder, name="lora"):
    return folder / SCORE_JOURNAL.format(name=name)


def stopped_run(folder, records, settings):
    with pytest.raises(Stop):
        evaluation.evaluate("m", None, records, "score", settings,
                            journal=StopsAfterTwoBatches(journal_path(folder), HEADER))


def test_a_stopped_run_resumes_where_it_ended_and_gives_the_same_rows(tmp_path, fake_scorer):
    records, settings = block_records(7), evaluation.EvalSettings(batch_size=2)
    whole, whole_metrics = evaluation.evaluate("m", None, records, "score", settings)
    order = [u for batch in fake_scorer for u in batch]  # longest records first
    assert sorted(order) == list(range(7)) and order != list(range(7))
    stopped_run(tmp_path, records, settings)
    fake_scorer.clear()
    journal = open_score_journal(tmp_path, HEADER, resume=True)
    assert journal.records == 4
    rows, metrics = evaluation.evaluate("m", None, records, "score", settings, journal=journal)
    assert fake_scorer == [order[4:6], order[6:]]  # only the records the stopped run had not scored
    assert rows == whole and metrics["auc"] == whole_metrics["auc"] and metrics["n"] == whole_metrics["n"]
    journal.close()
    assert not journal_path(tmp_path).exists()


def test_rows_come_back_in_record_order_whatever_order_scores_them():
    records = block_records(7)
    order = evaluation.longest_first(records)
    ordered = [records[i] for i in order]
    rows = [{"user_id": r["user_id"], "block": j} for r in ordered for j in range(len(r["blocks"]))]
    assert evaluation.in_record_order(rows, ordered, order) == \
        [{"user_id": r["user_id"], "block": j} for r in records for j in range(len(r["blocks"]))]
    sizes = [len(r["blocks"]) for r in ordered]
    assert sizes == sorted(sizes, reverse=True) and evaluation.longest_first([{"user_id": 1}]) is None


def test_a_saved_run_is_never_overwritten_or_mixed_with_another(tmp_path, fake_scorer):
    stopped_run(tmp_path, block_records(5), evaluation.EvalSettings(batch_size=2))
    saved = journal_path(tmp_path).read_text()
    with pytest.raises(DataError, match=r"lora_predictions.partial.jsonl: an unfinished scoring run is saved here "
                                        r"\(2 batches\); add --resume"):
        open_score_journal(tmp_path, HEADER, resume=False)
    with pytest.raises(DataError, match="another records; repeat that run's flags, or use another --output_dir"):
        open_score_journal(tmp_path, {**HEADER, "records": "other"}, resume=True)
    assert journal_path(tmp_path).read_text() == saved
    assert not open_score_journal(tmp_path, {**HEADER, "model": "base"}, resume=False).done  # the base model's own


def test_a_line_cut_off_by_a_kill_is_dropped(tmp_path, capsys):
    journal = ScoreJournal(journal_path(tmp_path), HEADER)
    journal.add(0, 2, [{"p_yes": 0.5}, {"p_yes": 0.25}], 1.5)
    with open(journal.path, "a") as f:
        f.write('{"unit": "2", "records": 2, "seconds": 1.0, "rows": [{"p_y')
    resumed = open_score_journal(tmp_path, HEADER, resume=True)
    assert resumed.done == {"0": {"records": 2, "seconds": 1.5, "rows": [{"p_yes": 0.5}, {"p_yes": 0.25}]}}
    assert len(journal.path.read_text().splitlines()) == 2 and "RESUMING scoring (lora): 2 records" in \
        capsys.readouterr().out


def test_resume_without_a_saved_run_starts_from_the_first_record(tmp_path, capsys):
    journal = open_score_journal(tmp_path, HEADER, resume=True)
    assert not journal.done and "starts from the first record" in capsys.readouterr().out


def test_the_header_names_what_is_scored():
    from recsft.config import ModelArgs

    def header(records=block_records(3), settings=evaluation.EvalSettings(), model=ModelArgs(), adapter="a"):
        return score_header(records, "lora", "score", settings, model, adapter)
    assert header() == header(records=block_records(3)) == header(model=ModelArgs(num_threads="1"))
    assert header() != header(records=block_records(3)[:2] + [{}])
    assert header() != header(settings=evaluation.EvalSettings(batch_size=4))
    assert header() != header(model=ModelArgs(dtype="float32")) != header(adapter="b")
