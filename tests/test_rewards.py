"""Rewards: each built-in verifier on hand-written answers (pass and fail), weights, user
functions by module and by file path, and the errors that name the function and the row."""

import sys
import textwrap

import pytest

from slimtune.errors import ConfigError, DataError
from slimtune.rewards import BUILTINS, compute_rewards, load_function, parse_specs


def one(spec, text, ended=True, n_tokens=None, **row):
    """The single reward of one completion under one spec."""
    total, per = compute_rewards([spec], ["a prompt"], [text], {k: [v] for k, v in row.items()}, [ended],
                                 n_tokens=None if n_tokens is None else [n_tokens])
    assert list(per) == [spec.get("label", spec["name"])]
    return float(total[0])


THREE_BULLETS = "- apples\n- pears\n- plums"


def test_ifeval_scores_the_share_of_a_rows_constraints_passed_or_all_of_them():
    cons = [{"type": "bullets", "n": 3}, {"type": "lowercase"}, {"type": "keywords", "words": ["figs"]}]
    assert one({"name": "ifeval"}, THREE_BULLETS, constraints=cons) == pytest.approx(2 / 3)
    assert one({"name": "ifeval"}, THREE_BULLETS + "\n- figs", constraints=cons) == pytest.approx(2 / 3)
    assert one({"name": "ifeval"}, "- apples\n- figs\n- plums", constraints=cons) == 1.0
    assert one({"name": "ifeval", "mode": "all"}, THREE_BULLETS, constraints=cons) == 0.0
    assert one({"name": "ifeval", "mode": "all"}, "- apples\n- figs\n- plums", constraints=cons) == 1.0
    # CSV-style rows carry the constraints as JSON text
    assert one({"name": "ifeval"}, "Hello There", constraints='[{"type": "uppercase"}]') == 0.0
    assert one({"name": "ifeval"}, "HELLO THERE", constraints='[{"type": "uppercase"}]') == 1.0


def test_exact_and_numeric_match_the_gold_column():
    assert one({"name": "exact"}, " Paris. ", answer="paris") == 1.0
    assert one({"name": "exact"}, "It is Paris", answer="paris") == 0.0
    assert one({"name": "exact", "extract": r"answer:\s*(\w+)"}, "I think... answer: Paris", answer="Paris") == 1.0
    assert one({"name": "exact", "extract": r"answer:\s*(\w+)"}, "no idea", answer="Paris") == 0.0
    assert one({"name": "exact", "column": "gold"}, "4", gold=4) == 1.0
    assert one({"name": "numeric"}, "3 apples plus 4 makes 7.", answer="7") == 1.0
    assert one({"name": "numeric"}, "The total is 1,250.0", answer=1250) == 1.0
    assert one({"name": "numeric"}, "7 is wrong, it is 8", answer="7") == 0.0  # the last number counts
    assert one({"name": "numeric", "tol": 0.001}, "pi is about 3.14159", answer=3.14) == 0.0
    assert one({"name": "numeric", "tol": 0.001}, "pi is about 3.1405", answer=3.14) == 1.0
    assert one({"name": "numeric"}, "no number here", answer="7") == 0.0
    assert one({"name": "numeric"}, "it is -2.5", answer="-2.5") == 1.0


def test_regex_json_ended():
    assert one({"name": "regex", "pattern": r"\bP\.S\."}, "Hi.\nP.S. bye") == 1.0
    assert one({"name": "regex", "pattern": r"\bP\.S\."}, "Hi. bye") == 0.0
    assert one({"name": "regex", "pattern": r"[a-z ]+", "full": True}, " only lower words ") == 1.0
    assert one({"name": "regex", "pattern": r"[a-z ]+", "full": True}, "Not only lower") == 0.0
    assert one({"name": "json", "keys": ["name", "age"]}, '```json\n{"name": "Al", "age": 3}\n```') == 1.0
    assert one({"name": "json", "keys": ["name", "age"]}, '{"name": "Al"}') == 0.0
    assert one({"name": "json", "keys": ["name"]}, 'Sure! {"name": "Al"}') == 0.0
    assert one({"name": "ended"}, "done", ended=True) == 1.0
    assert one({"name": "ended"}, "cut o", ended=False) == 0.0


def test_length_is_one_in_range_and_falls_off_linearly_outside():
    words = lambda k: " ".join(["word"] * k)  # noqa: E731
    spec = {"name": "length", "min": 10, "max": 20}
    assert [one(spec, words(k)) for k in (10, 15, 20)] == [1.0, 1.0, 1.0]
    assert one(spec, words(25)) == pytest.approx(0.5)    # 5 over, slack = 20 / 2
    assert one(spec, words(30)) == 0.0 and one(spec, words(60)) == 0.0
    assert one(spec, words(7)) == pytest.approx(0.4)     # 3 under, slack = 10 / 2
    assert one({**spec, "slack": 2}, words(21)) == pytest.approx(0.5)
    tok = {"name": "length", "max": 8, "unit": "tokens"}
    assert one(tok, "whatever", n_tokens=8) == 1.0 and one(tok, "whatever", n_tokens=10) == pytest.approx(0.5)
    with pytest.raises(DataError, match="token counts"):
        one(tok, "whatever")


def test_weights_sum_into_the_total_and_each_function_is_reported():
    comps = [THREE_BULLETS, "x"]
    total, per = compute_rewards([{"name": "ended", "weight": 0.5}, {"name": "regex", "pattern": "-", "weight": 2}],
                                 ["p", "p"], comps, {}, [True, False])
    assert per["ended"].tolist() == [1.0, 0.0] and per["regex"].tolist() == [1.0, 0.0]
    assert total.tolist() == [2.5, 0.0]


def test_specs_are_checked_before_any_reward_runs():
    assert parse_specs(["ended"]) == [{"name": "ended", "weight": 1.0, "label": "ended", "args": {}}]
    with pytest.raises(ConfigError, match="unknown reward 'bulets'.*ifeval"):
        parse_specs([{"name": "bulets"}])
    with pytest.raises(ConfigError, match=r"rewards\[0\] \(length\).*maxx.*its arguments: min, max, unit, slack"):
        parse_specs([{"name": "length", "maxx": 3}])
    with pytest.raises(ConfigError, match="unit must be one of words, tokens"):
        parse_specs([{"name": "length", "unit": "chars"}])
    with pytest.raises(ConfigError, match="pattern"):
        parse_specs([{"name": "regex"}])
    with pytest.raises(ConfigError, match="weight must be a number"):
        parse_specs([{"name": "ended", "weight": "high"}])
    with pytest.raises(ConfigError, match="second reward named 'ended'"):
        parse_specs(["ended", "ended"])
    assert len(parse_specs(["ended", {"name": "ended", "label": "ended2"}])) == 2
    assert set(BUILTINS) == {"ifeval", "exact", "numeric", "regex", "json", "length", "ended"}


def test_a_builtin_on_a_bad_row_names_the_reward_and_the_row_with_its_file_line():
    with pytest.raises(DataError, match=r"reward 'ifeval' on row 1 \(train.jsonl:8\): unknown constraint"):
        compute_rewards(["ifeval"], ["p", "p"], ["a", "b"], {"constraints": [[{"type": "lowercase"}], [{"type": "nope"}]]},
                        [True, True], where=["train.jsonl:7", "train.jsonl:8"])
    with pytest.raises(DataError, match="reward 'exact' on row 0: no column 'answer'"):
        compute_rewards(["exact"], ["p"], ["a"], {}, [True])


# --- user functions

USER = """
def brevity(prompts, completions, **columns):
    return [1.0 / (1 + len(c.split())) for c in completions]

def uses_gold(prompts, completions, gold, bonus=0.0, **_):
    return [float(g in c) + bonus for c, g in zip(completions, gold)]

def short(prompts, completions, **_):
    return [1.0] * (len(completions) - 1)

def picky(prompts, completions, **_):
    return [1.0 / (c != "boom") for c in completions]

def nan(prompts, completions, **_):
    return [float("nan")] * len(completions)
"""


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / "my_rewards_mod.py").write_text(textwrap.dedent(USER))
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("my_rewards_mod", None)


def test_user_function_by_module_path_and_by_file_path_gets_the_rows_columns(user_module):
    comps = ["one", "two words", "the gold is here"]
    cols = {"gold": ["one", "x", "gold"]}
    for name in ("my_rewards_mod:uses_gold", f"{user_module / 'my_rewards_mod.py'}:uses_gold"):
        total, per = compute_rewards([{"name": name, "label": "g", "bonus": 0.5}], ["p"] * 3, comps, cols, [True] * 3)
        assert per["g"].tolist() == [1.5, 0.5, 1.5]
    total, _ = compute_rewards(["my_rewards_mod:brevity", {"name": "ended", "weight": 3}], ["p"] * 3, comps, cols,
                               [True, False, True])
    assert total.tolist() == pytest.approx([0.5 + 3, 1 / 3, 0.2 + 3])
    assert load_function(f"{user_module / 'my_rewards_mod.py'}:brevity") is \
        load_function(f"{user_module / 'my_rewards_mod.py'}:brevity")  # a file is imported once


def test_a_missing_user_function_or_file_is_a_config_error(user_module, tmp_path):
    with pytest.raises(ConfigError, match="has no function 'nothere'"):
        load_function("my_rewards_mod:nothere")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        load_function("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="no file"):
        load_function(f"{tmp_path / 'absent.py'}:f")
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(ConfigError, match="loading .*broken.py failed: SyntaxError"):
        load_function(f"{tmp_path / 'broken.py'}:f")


def test_a_user_function_returning_the_wrong_length_names_the_function(user_module):
    with pytest.raises(ConfigError, match="reward 'my_rewards_mod:short' returned 2 values for 3 completions"):
        compute_rewards(["my_rewards_mod:short"], ["p"] * 3, ["a", "b", "c"], {}, [True] * 3)


def test_a_user_function_that_raises_names_the_function_and_the_row_that_fails(user_module):
    where = ["data.jsonl:3", "data.jsonl:4", "data.jsonl:9"]
    with pytest.raises(DataError, match=r"reward 'my_rewards_mod:picky' on row 1 \(data.jsonl:4\): ZeroDivisionError"):
        compute_rewards(["my_rewards_mod:picky"], ["p"] * 3, ["fine", "boom", "ok"], {}, [True] * 3, where=where)
    with pytest.raises(DataError, match=r"reward 'my_rewards_mod:nan' on row 0: returned nan, not a finite number"):
        compute_rewards(["my_rewards_mod:nan"], ["p"] * 2, ["a", "b"], {}, [True] * 2)


def test_a_user_argument_that_shadows_a_column_is_refused(user_module):
    with pytest.raises(ConfigError, match=r"clash with the data's columns"):
        compute_rewards([{"name": "my_rewards_mod:uses_gold", "gold": ["x"]}], ["p"], ["a"], {"gold": ["a"]}, [True])
