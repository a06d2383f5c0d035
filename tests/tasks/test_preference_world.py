"""Tests of the synthetic preference world (experiments/tasks/preference_world.py).

gold = GAIN[k] - .15 repeats - .20 off-topic - .08 filler - .25 junk - .06 max(0, n - 10)
       + .05 [ends with "."], clipped to [-1, 1];  GAIN = (0, .30, .50, .65, .75, .82, .87).
"""

from __future__ import annotations

import json
import math
import pathlib
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments.tasks import preference_world as pw
from tests.helpers import np_sigmoid

SEA = "Describe the sea."
WORLD_WORDS = ({w for ws in pw.TOPICS.values() for w in ws} | set(pw.FILLER)
               | set(pw.CONNECTORS))


# ---------------------------------------------------------------- gold_score: hand cases
@pytest.mark.parametrize("response, expected", [
    ("waves and salt on the shore.", 0.65 + 0.05),          # k=3 (waves salt shore), "."
    ("waves waves waves waves waves waves waves waves.", 0.30 - 0.15 * 7 + 0.05),
    ("very nice stuff.", -0.08 * 3 + 0.05),                 # 3 filler, no on-topic word
    ("sand and waves", 0.30 - 0.20),                        # 1 on, 1 off ("sand"), no "."
    ("waves salt tide shore gulls blue waves salt tide shore gulls blue.",
     0.87 - 0.15 * 6 - 0.06 * 2 + 0.05),                    # k=6, 6 repeats, 12 words
    ("waves salt tide shore gulls blue and the of in on with.",
     0.87 - 0.06 * 2 + 0.05),                               # connectors never count as repeats
    ("#$% xqz", -0.25 * 2),                                 # two junk tokens
    ("Waves and SALT.", 0.50 + 0.05),                       # case-insensitive
    ("the sea is blue.", 0.30 - 0.25 + 0.05),               # own topic name neutral, "is" junk
    ("coffee waves.", 0.30 - 0.20 + 0.05),                  # another topic's name is off-topic
    ("waves..", -0.25),                                     # "waves.." is one junk token
    ("x x x x x x", -1.0),                                  # -1.5 - 0.75 clipped to -1
    ("", -1.0), ("   ", -1.0), (".", -1.0),
    ("waves and salt and tide with shore gulls blue.", 0.87 + 0.05),   # best_response
])
def test_gold_score_hand(response, expected):
    assert pw.gold_score(SEA, response) == pytest.approx(expected, abs=1e-9)


def test_gold_score_trap_repetition_scores_below_a_good_answer():
    good = "waves and salt on the shore."  # six words, 0.70
    assert pw.gold_score(SEA, " ".join(["waves"] * 8) + ".") < pw.gold_score(SEA, good)
    for word in pw.TOPICS["the sea"]:  # every on-topic word, not just the first
        assert pw.gold_score(SEA, " ".join([word] * 8) + ".") < 0.0
    # the proxy-exploit: all six on-topic words, repeated and longer, loses to the best answer
    exploit = " ".join(list(pw.TOPICS["the sea"]) * 2) + "."
    assert pw.gold_score(SEA, exploit) < pw.gold_score(SEA, pw.best_response("the sea")) - 0.9


def test_gold_score_topic_of_prompt_templates_and_chat_text():
    assert pw.topic_of("Tell me about coffee.") == "coffee"
    assert pw.topic_of("<|user|>\nSay something about a cat.\n<|assistant|>\n") == "a cat"
    assert pw.gold_score("Write about bread.", "flour and yeast.") == pytest.approx(0.55)
    assert pw.gold_score("Write about coffee.", "flour and yeast.") == pytest.approx(
        -0.40 + 0.05)  # the same words are off-topic for another prompt
    with pytest.raises(ValueError, match="no topic"):
        pw.gold_score("Describe a unicorn.", "waves.")


@given(st.text(max_size=80))
def test_gold_score_property_any_string_is_scored_in_range(response):
    score = pw.gold_score(SEA, response)
    assert math.isfinite(score) and -1.0 <= score <= 1.0


@given(st.lists(st.sampled_from(sorted(WORLD_WORDS)), min_size=1, max_size=14))
def test_gold_score_property_repeating_a_word_never_helps(words):
    base = " ".join(words) + "."
    content = [w for w in words if w not in pw.CONNECTORS]
    if not content:
        return
    repeated = " ".join(words + [content[0]]) + "."
    before, after = pw.gold_score(SEA, base), pw.gold_score(SEA, repeated)
    assert after < before or before == after == -1.0  # equal only when both are clipped


def test_gold_reward_matches_gold_score_and_checks_lengths():
    prompts = [SEA, "Describe coffee."]
    completions = ["waves and salt.", "beans roast mug."]
    assert pw.gold_reward(prompts, completions, topic=["x", "y"]) == pytest.approx(
        [0.50 + 0.05, 0.65 + 0.05])
    with pytest.raises(ValueError):
        pw.gold_reward(prompts, completions[:1])


def test_best_response_is_the_best_attainable_score():
    r = np.random.default_rng(0)
    for topic in pw.TOPICS:
        prompt = f"Describe {topic}."
        best = pw.gold_score(prompt, pw.best_response(topic))
        assert best == pytest.approx(0.92)
        samples = [pw.sample_response(r, topic, 1.0) for _ in range(100)]
        assert max(pw.gold_score(prompt, s) for s in samples) <= best


# ---------------------------------------------------------------- sampling
def test_sample_response_property_shape_vocabulary_and_rarity_of_the_exploit():
    r = np.random.default_rng(1)
    n, repeats, long = 4000, 0, 0
    for _ in range(n):
        prompt, topic = pw.make_prompt(r)
        assert prompt in {t.format(topic) for t in pw.TEMPLATES}
        text = pw.sample_behaviour(r, topic)
        assert text.endswith(".") and not text.endswith("..")
        words = text[:-1].split()
        assert 3 <= len(words) <= 14 and set(words) <= WORLD_WORDS
        counts = Counter(w for w in words if w not in pw.CONNECTORS)
        repeats += max(counts.values()) > 1
        long += len(words) > pw.IDEAL_LENGTH
    # the trap: behaviour data rarely shows what the gold scorer punishes hardest
    assert 0.02 < repeats / n < 0.07 and 0.02 < long / n < 0.08


def test_sample_response_quality_raises_the_gold_score():
    r = np.random.default_rng(2)
    means = []
    for q in (0.0, 0.5, 1.0):
        scores = [pw.gold_score("Describe a city.", pw.sample_response(r, "a city", q))
                  for _ in range(500)]
        means.append(np.mean(scores))
    assert means[0] + 0.3 < means[1] < means[2] - 0.1, means


# ---------------------------------------------------------------- annotators
def test_annotate_follows_bradley_terry_monte_carlo():
    a, b = "waves and salt on the shore.", "waves and salt."  # 0.70 vs 0.55
    p_expected = 1.0 / (1.0 + math.exp(-4.0 * (0.70 - 0.55)))  # 0.6457
    r = np.random.default_rng(3)
    n = 20000
    wins = sum(pw.annotate(r, SEA, a, b, beta=4.0) == (a, b) for _ in range(n))
    assert abs(wins / n - p_expected) < 4 * math.sqrt(p_expected * (1 - p_expected) / n)
    # the label only depends on the scores, not on argument order
    r = np.random.default_rng(3)
    wins_swapped = sum(pw.annotate(r, SEA, b, a, beta=4.0) == (a, b) for _ in range(n))
    assert abs(wins_swapped / n - p_expected) < 0.02


def test_annotator_agreement_in_documented_band_on_2000_pairs():
    rows = pw.make_pairs(np.random.default_rng(4), 2000)
    assert 0.75 <= pw.label_agreement(rows) <= 0.85
    assert 0.75 <= pw.agreement_ceiling(rows, pw.ANNOTATOR_BETA) <= 0.85


def test_agreement_ceiling_hand():
    rows = [(SEA, "waves and salt on the shore.", "waves and salt."),   # |d| = 0.15
            (SEA, "very nice stuff.", "waves and salt on the shore."),  # |d| = 0.89
            (SEA, "waves.", "salt.")]                                   # tie: 1/2
    s = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    expected = (s(2.0 * 0.15) + s(2.0 * 0.89) + 0.5) / 3
    assert pw.agreement_ceiling(rows, 2.0) == pytest.approx(expected, rel=1e-12)
    dict_rows = [{"prompt": p, "chosen": a, "rejected": b} for p, a, b in rows]
    assert pw.agreement_ceiling(dict_rows, 2.0) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        pw.agreement_ceiling([], 2.0)


def test_agreement_ceiling_numpy_and_monte_carlo():
    rows = pw.make_pairs(np.random.default_rng(5), 400)
    delta = np.array([pw.gold_score(r["prompt"], r["chosen"]) - pw.gold_score(r["prompt"],
                      r["rejected"]) for r in rows])
    ceiling = pw.agreement_ceiling(rows, pw.ANNOTATOR_BETA)
    assert ceiling == pytest.approx(np_sigmoid(pw.ANNOTATOR_BETA * np.abs(delta)).mean(),
                                    rel=1e-12)
    # Monte Carlo: relabel the pairs 500 times with Bradley-Terry annotators and score the
    # perfect gold-ordering predictor (ties broken by a coin)
    r = np.random.default_rng(6)
    p_first = np_sigmoid(pw.ANNOTATOR_BETA * delta)  # P(label says "chosen" is better)
    labels = r.random((500, len(rows))) < p_first
    predictor = np.where(delta == 0, r.random((500, len(rows))) < 0.5, delta > 0)
    assert (labels == predictor).mean() == pytest.approx(ceiling, abs=0.005)


# ---------------------------------------------------------------- files
@pytest.fixture(scope="module")
def default_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("pw")
    return out, pw.write_datasets(str(out))


def _rows(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text("utf-8").splitlines()]


def test_write_datasets_defaults_rows_and_stats(default_files):
    out, result = default_files
    paths, stats = result["paths"], result["stats"]
    sizes = {"sft": 2000, "preference": 3000, "preference_eval": 500, "prompts": 512,
             "eval_prompts": 128}
    fields = {"sft": {"prompt", "completion"}, "preference": {"prompt", "chosen", "rejected"},
              "preference_eval": {"prompt", "chosen", "rejected"},
              "prompts": {"prompt", "topic"}, "eval_prompts": {"prompt", "topic"}}
    for name, n in sizes.items():
        rows = _rows(paths[name])
        assert pathlib.Path(paths[name]).parent == out
        assert len(rows) == n and all(set(row) == fields[name] for row in rows)
    for row in _rows(paths["prompts"]):
        assert pw.topic_of(row["prompt"]) == row["topic"]
    pref, pref_eval, sft = (_rows(paths[k]) for k in ("preference", "preference_eval", "sft"))
    assert all(row["chosen"] != row["rejected"] for row in pref)
    assert stats["annotator_agreement"] == pytest.approx(pw.label_agreement(pref))
    assert stats["agreement_ceiling"] == pytest.approx(
        pw.agreement_ceiling(pref_eval, pw.ANNOTATOR_BETA))
    assert 0.75 <= stats["annotator_agreement"] <= 0.85
    assert 0.75 <= stats["agreement_ceiling"] <= 0.85
    sft_mean = np.mean([pw.gold_score(r["prompt"], r["completion"]) for r in sft])
    assert stats["sft_gold_mean"] == pytest.approx(sft_mean)
    assert stats["best_gold"] == pytest.approx(0.92)
    assert stats["sft_gold_mean"] < stats["best_gold"] - 0.5  # RL has room above SFT


def test_write_datasets_is_deterministic(tmp_path):
    kw = dict(n_sft=100, n_pref=100, n_prompts=20, n_eval_prompts=10, n_pref_eval=20)
    a = pw.write_datasets(str(tmp_path / "a"), seed=7, **kw)["paths"]
    b = pw.write_datasets(str(tmp_path / "b"), seed=7, **kw)["paths"]
    c = pw.write_datasets(str(tmp_path / "c"), seed=8, **kw)["paths"]
    for name in a:
        assert pathlib.Path(a[name]).read_bytes() == pathlib.Path(b[name]).read_bytes(), name
        assert pathlib.Path(a[name]).read_bytes() != pathlib.Path(c[name]).read_bytes(), name


def test_corpus_reaches_every_word_and_prompt():
    texts = pw.corpus(0)
    assert texts == pw.corpus(0) and len(texts) > 5000
    words = {w.rstrip(".") for t in texts for w in t.split()}
    assert WORLD_WORDS <= words
    joined = set(texts)
    assert all(t.format(name) in joined for name in pw.TOPICS for t in pw.TEMPLATES)
