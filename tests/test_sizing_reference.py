"""The native estimator and planner against plain-Python references on large
random mixed lists: long enough that the binding's look-ahead (prefetching
items ahead of the one being estimated) runs over items of every storage
width, str subclasses, empty strings and lone surrogates, and hands over at
every position near the end of the list."""
import random

import pytest

import batchgate
from batchgate import _native
from reference_sizing import script_estimate

WEIGHTS = _native._estimator_weights

# Pieces a review can be made of: each one pushes the str to a storage width
# (1, 2 or 4 bytes) or exercises another class of the script model.
PIECES = [
    "the", "Great", "food", "x", "Q",                 # ASCII letters
    "0", "16,000", "2026",                            # digits
    " ", "  ", "\t", "\n", "\r\n", "\u3000", "\xa0",  # spaces, newlines
    ".", "!!", "?!", "~", "...", "(", "*",            # ASCII punctuation
    "\xe9t\xe9", "\xd7", "\xbf",                      # Latin-1 letters and signs
    "\u0416\u0430\u0440", "\u03b1\u03b2",             # Cyrillic, Greek
    "가", "맛있어요", "정말", "최고", "ㅋㅋㅋ", "ㅎㅎ",   # Hangul syllables, jamo
    "\u1100\u1161", "\ud7b0",                         # conjoining jamo
    "中文", "ひらがな", "\U00020000",                   # CJK, kana, plane 2
    "e\u0301", "a\u0308\u0323", "\u0300",             # combining marks
    "😀", "👍🏽", "👨\u200d👩\u200d👧", "❤\ufe0f", "🇰🇷", "★", "⭐",  # emoji
    "\u2026", "\u201c", "\uff01", "\u3001",           # general and CJK punctuation
    "\u0e01", "\u05d0", "\U0001d400", "\x00", "\x7f",  # other scripts, controls
    "\ud800", "\udfff", "\udbff\udc00",               # lone surrogates
]


class Text(str):
    """A str subclass: CPython stores these apart from their header."""


def random_text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.03:
        return ""
    n = rng.choice([1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 64, 121, 200, 600])
    parts = []
    size = 0
    # Mostly Korean and ASCII (like reviews), with everything else mixed in.
    common = PIECES[:22] + ["가", "맛있어요", "정말", "최고"] * 6
    while size < n:
        p = rng.choice(common if rng.random() < 0.8 else PIECES)
        parts.append(p)
        size += len(p)
    text = "".join(parts)[:n]
    return Text(text) if rng.random() < 0.05 else text


def random_texts(seed: int, n: int):
    rng = random.Random(seed)
    return [random_text(rng) for _ in range(n)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_estimate_many_matches_reference(seed):
    texts = random_texts(seed, 3000)
    assert {max(map(ord, t), default=0) < 0x100 for t in texts} == {True, False}
    assert any(isinstance(t, Text) for t in texts)
    want = [script_estimate(t, WEIGHTS) for t in texts]
    assert batchgate.estimate_many(texts) == want
    # Every tail length of the look-ahead, and one item at a time.
    for cut in range(1, 40):
        assert batchgate.estimate_many(texts[-cut:]) == want[-cut:]
    assert [batchgate.estimate_tokens(t) for t in texts[:500]] == want[:500]


def reference_plan(texts, budget, max_batch_size=None, overhead=0):
    """Greedy contiguous split with the reference estimates (oversize alone)."""
    batches, sums = [], []
    cur, cur_tokens = [], 0
    room = budget - overhead
    for t in texts:
        n = script_estimate(t, WEIGHTS)
        full = cur and (cur_tokens + n > room or len(cur) == (max_batch_size or 0))
        if n > room or full:
            if cur:
                batches.append(cur)
                sums.append(overhead + cur_tokens)
            cur, cur_tokens = [], 0
        if n > room:
            batches.append([t])
            sums.append(overhead + n)
            continue
        cur.append(t)
        cur_tokens += n
    if cur:
        batches.append(cur)
        sums.append(overhead + cur_tokens)
    return batches, sums


@pytest.mark.parametrize("budget,max_batch_size,overhead",
                         [(4000, None, 0), (300, 20, 17), (60, None, 5)])
def test_plan_matches_reference(budget, max_batch_size, overhead):
    texts = random_texts(budget, 4000)
    plan = batchgate.plan_batches(texts, budget, max_batch_size=max_batch_size,
                                  overhead_tokens=overhead, oversize="alone")
    want_batches, want_sums = reference_plan(texts, budget, max_batch_size, overhead)
    assert len(plan) == len(want_batches)
    assert [list(b) for b in plan] == want_batches
    assert plan.token_counts == want_sums
    # The batches hold the very objects passed in, subclasses included.
    flat = [t for b in plan for t in b]
    assert all(a is b for a, b in zip(flat, texts)) and len(flat) == len(texts)
