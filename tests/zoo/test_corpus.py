"""The grammar: deterministic, varied, and task prompts that mean what they say."""

from __future__ import annotations

import pytest

from saebench.zoo import corpus


def test_corpus_is_deterministic_in_its_seed():
    assert corpus.corpus(3, 20) == corpus.corpus(3, 20)
    assert corpus.corpus(3, 20) != corpus.corpus(4, 20)


@pytest.mark.parametrize("task", corpus.TASKS)
def test_task_prompts_are_distinct_and_well_formed(task):
    rows = corpus.task_prompts(task, seed=7, n=200)
    assert len({r["prompt"] for r in rows}) == 200
    assert all(r["answer"] != r["distractor"] for r in rows)


def test_ioi_answer_is_the_name_not_repeated():
    for row in corpus.task_prompts("ioi", seed=1, n=50):
        clause = row["prompt"].split(". ", 1)[1]
        assert clause.count(row["answer"]) == 1
        assert clause.count(row["distractor"]) == 2


def test_agreement_answer_agrees_with_the_head_noun():
    plural_verbs = {plural for _, plural in corpus.AGREEMENT_VERBS}
    for row in corpus.task_prompts("agreement", seed=2, n=50):
        head = row["prompt"].split("The ")[-1].split()[0]
        assert (head in corpus.NOUNS.values()) == (row["answer"] in plural_verbs)


def test_closing_quote_prompts_end_inside_an_open_quote():
    for row in corpus.task_prompts("closing_quote", seed=3, n=50):
        assert row["prompt"].count('"') % 2 == 1
        assert row["prompt"].endswith(".")


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        corpus.task_prompts("nope", seed=0, n=1)
