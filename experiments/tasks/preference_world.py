"""A synthetic preference world: short texts, a hidden gold scorer, noisy annotators.

The task makes RLHF learnable by a ~1-3M parameter model with a ~512-token byte-level BPE in a
few CPU minutes, and it shows the classic phenomena. Everything is generated from a seed; nothing
is downloaded.

The world. 16 topics ("the sea", "coffee", ...), each with 6 on-topic words (sea: waves, salt,
tide, shore, gulls, blue); generic filler words ("very", "nice", "stuff", ...); neutral
connectors ("and", "the", "on", ...). A prompt names one topic ("Describe the sea."); a response
is a short lower-case sentence ending with "." ("waves and salt on the shore."). The vocabulary
is fixed in this module so that ``gold_score`` is a pure function of text; the seed drives all
sampling.

The gold scorer (``gold_score``), range [-1, 1], encodes human-like preferences::

    gold = GAIN[k]                     k = distinct on-topic words (diminishing returns)
         - 0.15 * repeats             repeats = sum over non-connector words of (count - 1)
         - 0.20 * off_topic           words (or names) of the other topics
         - 0.08 * filler              "very", "nice", "stuff", ...
         - 0.25 * junk                any token that is not a lower-cased world word
         - 0.06 * max(0, n - 10)      n = words; the ideal length is <= 10 words
         + 0.05 * [ends with one "."]
    clipped to [-1, 1];  an empty response scores -1.

with GAIN = (0, .30, .50, .65, .75, .82, .87). The best attainable score is 0.92 (all six
on-topic words, nothing else needed, a final "."); ``best_response`` writes one.

THE TRAP (reward over-optimisation, Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization"). The behaviour distribution that produces the preference data almost never
repeats a word (4%) or runs past 10 words (4%). Within that data the gold score is explained
almost entirely by "how many on-topic words", so a proxy reward model learned from it rewards
more on-topic words but never sees the repetition and length penalties. A policy optimised hard
against the proxy first drops filler and off-topic words (gold rises), then learns to repeat
on-topic words and to get longer ("waves salt tide waves salt tide ..."), which the proxy likes
and the gold scorer punishes: gold reward rises, then falls as KL(policy || reference) grows.
Plot gold and proxy reward against KL to see it; a KL penalty or early stopping delays it.

Annotators (``annotate``) are Bradley-Terry on the gold score: P(a > b) = sigmoid(beta * (gold(a)
- gold(b))), with ``ANNOTATOR_BETA`` chosen so that labels agree with the gold ordering about
80% of the time on the behaviour pairs. ``agreement_ceiling`` is the best held-out accuracy any
reward model can expect against such labels.

Files (``write_datasets``), JSON lines, UTF-8: sft.jsonl {prompt, completion} from a *mediocre*
behaviour distribution (so RL has room above it); preference.jsonl and preference_eval.jsonl
{prompt, chosen, rejected}; prompts.jsonl and eval_prompts.jsonl {prompt, topic}. Completions
are the bare response text, without a leading space; chat formatting is the reader's job.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from rlhf_jax.fileio import atomic_write

TOPICS: dict[str, tuple[str, ...]] = {
    "the sea": ("waves", "salt", "tide", "shore", "gulls", "blue"),
    "a forest": ("trees", "moss", "leaves", "ferns", "owls", "shade"),
    "coffee": ("beans", "roast", "bitter", "mug", "steam", "crema"),
    "the desert": ("sand", "dunes", "cactus", "heat", "camels", "dry"),
    "a city": ("streets", "traffic", "towers", "crowds", "lights", "buses"),
    "winter": ("snow", "frost", "ice", "cold", "scarves", "sleds"),
    "a garden": ("roses", "soil", "tulips", "bees", "seeds", "weeds"),
    "the moon": ("craters", "orbit", "lunar", "phases", "glow", "dust"),
    "music": ("melody", "rhythm", "drums", "chords", "songs", "tempo"),
    "a library": ("books", "shelves", "quiet", "pages", "readers", "ink"),
    "the mountains": ("peaks", "rocks", "summit", "climbers", "cliffs", "eagles"),
    "bread": ("flour", "crust", "yeast", "oven", "dough", "loaf"),
    "a storm": ("thunder", "rain", "lightning", "wind", "clouds", "flood"),
    "the kitchen": ("pots", "knives", "stove", "spoons", "sink", "recipes"),
    "a cat": ("whiskers", "paws", "purring", "fur", "naps", "claws"),
    "the night": ("stars", "darkness", "crickets", "lamps", "dreams", "silence"),
}
"""Topic name (as it appears in prompts) -> its six on-topic words."""
FILLER: tuple[str, ...] = ("very", "really", "nice", "thing", "good", "stuff", "so", "quite",
                           "lovely", "things")
CONNECTORS: tuple[str, ...] = ("and", "the", "a", "of", "in", "on", "with")
TEMPLATES: tuple[str, ...] = ("Describe {}.", "Tell me about {}.", "Write about {}.",
                              "Say something about {}.")

GAIN: tuple[float, ...] = (0.0, 0.30, 0.50, 0.65, 0.75, 0.82, 0.87)
"""Gold gain for k = 0..6 distinct on-topic words (diminishing returns)."""
REPEAT_PENALTY, OFF_TOPIC_PENALTY, FILLER_PENALTY, JUNK_PENALTY = 0.15, 0.20, 0.08, 0.25
IDEAL_LENGTH, LENGTH_PENALTY, PERIOD_BONUS = 10, 0.06, 0.05
ANNOTATOR_BETA = 4.0
"""Bradley-Terry inverse temperature of the annotators (about 80% agreement with gold)."""
BEHAVIOUR_REPEAT_P, BEHAVIOUR_LONG_P = 0.04, 0.04
"""How rarely the behaviour distribution repeats a word / runs past IDEAL_LENGTH (the trap)."""

# name head word ("sea") -> topic name ("the sea")
_HEAD = {name.split()[-1]: name for name in TOPICS}
_HEAD_RE = re.compile(r"\b(" + "|".join(sorted(_HEAD, key=len, reverse=True)) + r")\b")
_WORD_TOPIC = {w: name for name, words in TOPICS.items() for w in words}
assert len(_WORD_TOPIC) == 6 * len(TOPICS), "on-topic words must be unique across topics"


def topic_of(prompt: str) -> str:
    """The topic a prompt names (the last topic name in it, so chat templates are fine).

    Raises ValueError when the prompt names no topic: prompts come from this world's files, so
    an unknown prompt is a wiring bug, not something to score.
    """
    found = _HEAD_RE.findall(prompt.lower())
    if not found:
        raise ValueError(f"prompt names no topic of the preference world: {prompt[:80]!r}")
    return _HEAD[found[-1]]


def _classify(topic: str, word: str) -> str:
    """One of "on", "neutral", "filler", "off", "junk" for a lower-cased token."""
    owner = _WORD_TOPIC.get(word)
    if owner is not None:
        return "on" if owner == topic else "off"
    if word in CONNECTORS:
        return "neutral"
    if word in FILLER:
        return "filler"
    if word in _HEAD:
        return "neutral" if _HEAD[word] == topic else "off"
    return "junk"


def score_response(topic: str, response: str) -> float:
    """Gold score of ``response`` for a topic name (see the module docstring for the formula)."""
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}")
    text = response.strip()
    period = text.endswith(".") and not text.endswith("..")
    tokens = (text[:-1] if period else text).lower().split()
    if not tokens:
        return -1.0
    kinds = Counter(_classify(topic, w) for w in tokens)
    counts = Counter(w for w in tokens if w not in CONNECTORS)
    distinct_on = min(sum(1 for w in counts if _classify(topic, w) == "on"), len(GAIN) - 1)
    repeats = sum(c - 1 for c in counts.values())
    score = (GAIN[distinct_on]
             - REPEAT_PENALTY * repeats
             - OFF_TOPIC_PENALTY * kinds["off"]
             - FILLER_PENALTY * kinds["filler"]
             - JUNK_PENALTY * kinds["junk"]
             - LENGTH_PENALTY * max(0, len(tokens) - IDEAL_LENGTH)
             + PERIOD_BONUS * period)
    return float(min(1.0, max(-1.0, score)))


def gold_score(prompt: str, response: str) -> float:
    """Hidden human-like score in [-1, 1] of ``response`` to ``prompt``; defined on any response.

    >>> gold_score("Describe the sea.", "waves and salt on the shore.")  # 0.65 + 0.05
    0.7
    """
    return round(score_response(topic_of(prompt), response), 10)


def gold_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """TRL-style reward function: the gold score of each (prompt, completion) pair."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [gold_score(p, c) for p, c in zip(prompts, completions)]


def best_response(topic: str) -> str:
    """A response with the best attainable gold score (0.92): all six on-topic words."""
    w = TOPICS[topic]
    return f"{w[0]} and {w[1]} and {w[2]} with {w[3]} {w[4]} {w[5]}."


def make_prompt(rng: np.random.Generator, topic: str | None = None) -> tuple[str, str]:
    """A random ``(prompt, topic)``; the topic is drawn uniformly unless given."""
    names = list(TOPICS)
    topic = names[rng.integers(len(names))] if topic is None else topic
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(topic), topic


def sample_response(rng: np.random.Generator, topic: str, quality: float, *,
                    repeat_p: float = BEHAVIOUR_REPEAT_P,
                    long_p: float = BEHAVIOUR_LONG_P) -> str:
    """Draw one response to ``topic``; higher ``quality`` in [0, 1] means more on-topic words.

    A target length of 3-10 words (11-14 with probability ``long_p``) is filled slot by slot:
    a connector (25%, never first or last), else an on-topic word (probability 0.2 + 0.7 *
    quality), an off-topic word (0.3 * (1 - quality)) or filler, each kind drawn without
    replacement (filler when a pool runs dry).
    With probability ``repeat_p`` one content word is then repeated 1-3 more times.
    """
    q = min(1.0, max(0.0, float(quality)))
    length = int(rng.integers(11, 15) if rng.random() < long_p else rng.integers(3, 11))
    others = [w for name, ws in TOPICS.items() if name != topic for w in ws]
    pools = {"on": list(rng.permutation(TOPICS[topic])), "off": list(rng.permutation(others)),
             "filler": list(rng.permutation(FILLER))}  # without replacement: no accidental repeats
    words: list[str] = []
    for i in range(length):
        if 0 < i < length - 1 and words[-1] not in CONNECTORS and rng.random() < 0.25:
            words.append(CONNECTORS[rng.integers(len(CONNECTORS))])
            continue
        u = rng.random()
        p_on, p_off = 0.2 + 0.7 * q, 0.3 * (1 - q)
        kind = "on" if u < p_on else "off" if u < p_on + p_off else "filler"
        words.append(str((pools[kind] or pools["filler"]).pop()))
    if rng.random() < repeat_p:
        content = [w for w in words if w not in CONNECTORS]
        word = content[rng.integers(len(content))]
        at = words.index(word)
        words[at:at] = [word] * int(rng.integers(1, 4))
    return " ".join(words[:14]) + "."


def sample_behaviour(rng: np.random.Generator, topic: str) -> str:
    """The mediocre behaviour policy behind the SFT and preference data: quality ~ U(0, 0.8)."""
    return sample_response(rng, topic, float(rng.uniform(0.0, 0.8)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def annotate(rng: np.random.Generator, prompt: str, a: str, b: str, *,
             beta: float) -> tuple[str, str]:
    """A noisy human label: ``(chosen, rejected)`` with P(a chosen) = sigmoid(beta * (gold(a) -
    gold(b))) (Bradley-Terry on the gold score)."""
    p_a = _sigmoid(beta * (gold_score(prompt, a) - gold_score(prompt, b)))
    return (a, b) if rng.random() < p_a else (b, a)


def _triples(pairs: Iterable) -> Iterable[tuple[str, str, str]]:
    for p in pairs:
        yield (p["prompt"], p["chosen"], p["rejected"]) if isinstance(p, Mapping) else tuple(p)


def agreement_ceiling(pairs: Iterable, beta: float) -> float:
    """The best held-out accuracy any reward model can expect against these noisy labels.

    A predictor that orders every pair exactly by gold score agrees with a Bradley-Terry
    annotator with probability sigmoid(beta * |gold(a) - gold(b)|) (0.5 for ties), so its
    expected accuracy is the mean of that over the pairs. ``pairs`` holds ``(prompt, a, b)``
    triples or ``{"prompt", "chosen", "rejected"}`` rows (the label does not matter here).
    """
    vals = [_sigmoid(beta * abs(gold_score(p, a) - gold_score(p, b)))
            for p, a, b in _triples(pairs)]
    if not vals:
        raise ValueError("agreement_ceiling of no pairs")
    return float(np.mean(vals))


def label_agreement(rows: Iterable) -> float:
    """Fraction of ``{"prompt", "chosen", "rejected"}`` rows whose label follows the gold
    ordering (a gold tie counts 1/2, so its expectation is ``agreement_ceiling``)."""
    vals = []
    for p, c, r in _triples(rows):
        d = gold_score(p, c) - gold_score(p, r)
        vals.append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)
    return float(np.mean(vals))


def make_pairs(rng: np.random.Generator, n: int, *, beta: float = ANNOTATOR_BETA) -> list[dict]:
    """``n`` labelled rows {prompt, chosen, rejected}: two distinct behaviour responses each."""
    rows = []
    while len(rows) < n:
        prompt, topic = make_prompt(rng)
        a, b = sample_behaviour(rng, topic), sample_behaviour(rng, topic)
        if a == b:
            continue
        chosen, rejected = annotate(rng, prompt, a, b, beta=beta)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def _write_jsonl(path: str, rows: Sequence[dict]) -> None:
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"
                               for row in rows))


def write_datasets(out_dir: str, *, seed: int = 0, n_sft: int = 2000, n_pref: int = 3000,
                   n_prompts: int = 512, n_eval_prompts: int = 128,
                   n_pref_eval: int = 500) -> dict:
    """Write the five JSONL files of the task to ``out_dir``; byte-identical for a seed.

    Returns ``{"paths": {name: path}, "stats": {...}}`` with stats ``annotator_agreement``
    (label_agreement of preference.jsonl), ``agreement_ceiling`` (of preference_eval.jsonl),
    ``sft_gold_mean`` (mean gold of the SFT completions) and ``best_gold`` (best attainable).
    Each file has its own stream ``default_rng([seed, i])``, so changing one size leaves the
    other files unchanged.
    """
    os.makedirs(out_dir, exist_ok=True)
    rngs = [np.random.default_rng([seed, i]) for i in range(5)]
    sft = []
    for _ in range(n_sft):
        prompt, topic = make_prompt(rngs[0])
        sft.append({"prompt": prompt, "completion": sample_behaviour(rngs[0], topic)})
    pref, pref_eval = make_pairs(rngs[1], n_pref), make_pairs(rngs[2], n_pref_eval)
    prompts = [dict(zip(("prompt", "topic"), make_prompt(rngs[3]))) for _ in range(n_prompts)]
    evals = [dict(zip(("prompt", "topic"), make_prompt(rngs[4]))) for _ in range(n_eval_prompts)]
    files = {"sft": sft, "preference": pref, "preference_eval": pref_eval,
             "prompts": prompts, "eval_prompts": evals}
    paths = {}
    for name, rows in files.items():
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        _write_jsonl(paths[name], rows)
    stats = {
        "annotator_agreement": label_agreement(pref),
        "agreement_ceiling": agreement_ceiling(pref_eval, ANNOTATOR_BETA),
        "sft_gold_mean": float(np.mean(gold_reward([r["prompt"] for r in sft],
                                                   [r["completion"] for r in sft]))),
        "best_gold": max(score_response(t, best_response(t)) for t in TOPICS),
    }
    return {"paths": paths, "stats": stats}


def corpus(seed: int = 0, *, n_responses: int = 5000) -> list[str]:
    """Texts to train the BPE tokenizer on: every prompt, every world word, sampled responses."""
    rng = np.random.default_rng([seed, 99])
    texts = [t.format(name) for name in TOPICS for t in TEMPLATES]
    texts.append(" ".join([w for ws in TOPICS.values() for w in ws] + list(FILLER)
                          + list(CONNECTORS)) + ".")
    texts += [best_response(t) for t in TOPICS]
    for _ in range(n_responses):
        topic = list(TOPICS)[rng.integers(len(TOPICS))]
        texts.append(sample_response(rng, topic, float(rng.uniform(0.0, 1.0))))
    return texts
