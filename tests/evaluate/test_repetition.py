"""Repetition metrics on the failure shapes seen in the quickstart's own answers."""

from slimtune.evaluate.repetition import (distinct, in_loop, longest_repeated_span, repeated_lines,
                                          repetition_metrics, sample_repetition, tandem_repeat, words)


def test_loops_from_real_answers_are_caught():
    assert in_loop("Strawberries, Oranges, Oranges, Oranges, Oranges")        # one word 4 times
    assert in_loop("Start with a plan. Start with a plan. Start with a plan.")  # a phrase 3 times
    assert in_loop("1. Learn by yourself\n2. Practice daily\n3. Learn by yourself\n4. learn by yourself!")  # lines
    assert repeated_lines("- a b\n- c\n* A  B\n3) a b") == "a b"


def test_ordinary_text_is_not_a_loop():
    assert not in_loop("Strawberries, Oranges, Oranges, Oranges")  # a single word 3 times is allowed
    assert not in_loop("I think, therefore I am. I think you know.")
    assert not in_loop("very very good")
    assert not in_loop("- eggs\n- milk\n- eggs")  # a line twice
    assert tandem_repeat(words("a b a b")) is None and tandem_repeat(words("x a b a b a b")) == (2, 1)


def test_longest_repeated_span_does_not_overlap():
    assert longest_repeated_span(words("the cat sat on the mat and the cat sat down")) == 3
    assert longest_repeated_span(words("a a a a")) == 2          # "a a" twice, not "a a a" overlapping
    assert longest_repeated_span(words("one two three")) == 0
    assert longest_repeated_span([]) == 0


def test_distinct_n_pooled():
    assert distinct(["a b a b"], 1) == 0.5 and distinct(["a b a b"], 2) == 2 / 3
    assert distinct(["a b", "a c"], 1) == 3 / 4 and distinct(["a"], 2) is None
    assert words("Don't STOP, now!") == ["don't", "stop", "now"]


def test_repetition_metrics_aggregate():
    answers = [{"text": "go go go go", "ended": True}, {"text": "fine words here", "ended": False},
               {"text": "one two. one two. one two.", "ended": True}, {"text": "", "ended": True}]
    m = repetition_metrics(answers)
    assert m["loop_share"] == 0.5 and m["hit_limit_share"] == 0.25
    assert m["longest_repeat_max"] == 2 and m["longest_repeat_mean"] == (2 + 0 + 2 + 0) / 4  # "one two" x3: 2 without overlap
    assert m["distinct_1"] == 6 / 13
    assert sample_repetition(answers[1]) == {"loop": False, "longest_repeat": 0, "distinct_1": 1.0,
                                             "distinct_2": 1.0, "hit_limit": True}
    assert repetition_metrics([]) == {}
