"""Dynamic batch size (drop-in), the token estimator and the budget planner."""
import math
import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import batchgate
from batchgate import Config, _native
from reference_sizing import (
    OriginalConfig,
    chars_estimate,
    script_estimate,
    token_features,
)

KOREAN = "가나다라마바사아자차카타파하맛있어요정말최고의식당입니다서비스친절"
ENGLISH = "the quick brown fox jumps over lazy dog great food service"
EMOJI = ["😀", "👍", "🍜", "❤️", "👨‍👩‍👧", "🇰🇷"]
PUNCT = ".,!?~^()[]…·「」"


def random_review(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.05:
        return ""
    # Long-tailed lengths: most short, a few very long.
    n = int(rng.paretovariate(1.2) * 8)
    n = min(n, 20000 if rng.random() < 0.01 else 600)
    parts = []
    while sum(map(len, parts)) < n:
        r = rng.random()
        if r < 0.5:
            parts.append("".join(rng.choice(KOREAN) for _ in range(rng.randint(1, 6))))
        elif r < 0.75:
            parts.append(rng.choice(ENGLISH.split()))
        elif r < 0.82:
            parts.append(str(rng.randint(0, 10**6)))
        elif r < 0.9:
            parts.append(rng.choice(EMOJI))
        else:
            parts.append(rng.choice(PUNCT) * rng.randint(1, 3))
        parts.append(rng.choice([" ", " ", " ", "  ", "\n", ""]))
    return "".join(parts)[:n]


# ---------------------------------------------------------------------------
# calculate_dynamic_batch_size: exact agreement with the original formula

def test_defaults_match_original():
    assert Config.VLLM_MAX_TOKENS_PER_BATCH == 4000
    assert Config.VLLM_MIN_BATCH_SIZE == 10
    assert Config.VLLM_MAX_BATCH_SIZE == 100
    assert Config.VLLM_DEFAULT_BATCH_SIZE == 50
    assert Config.VLLM_MAX_CONCURRENT_BATCHES == 20
    assert Config.MAX_RETRIES == 3


def child_env(**overrides):
    """Environment for a child Python that imports this same batchgate."""
    pkg_parent = os.path.dirname(os.path.dirname(batchgate.__file__))
    path = os.pathsep.join([pkg_parent, os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, **overrides)


def test_environment_overrides_config():
    env = child_env( VLLM_MAX_TOKENS_PER_BATCH="1234", VLLM_MIN_BATCH_SIZE="3",
               VLLM_MAX_BATCH_SIZE="7", VLLM_DEFAULT_BATCH_SIZE="5",
               VLLM_MAX_CONCURRENT_BATCHES="9", MAX_RETRIES="1")
    code = ("from batchgate import Config as C; print(C.VLLM_MAX_TOKENS_PER_BATCH, "
            "C.VLLM_MIN_BATCH_SIZE, C.VLLM_MAX_BATCH_SIZE, C.VLLM_DEFAULT_BATCH_SIZE, "
            "C.VLLM_MAX_CONCURRENT_BATCHES, C.MAX_RETRIES, C.calculate_dynamic_batch_size([]), "
            "C.calculate_dynamic_batch_size(['a'*35]*3))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(__file__)).stdout.split()
    assert out == ["1234", "3", "7", "5", "9", "1", "5", "7"]


def test_bad_environment_value_is_named():
    env = child_env(VLLM_MAX_BATCH_SIZE="lots")
    proc = subprocess.run([sys.executable, "-c", "import batchgate"], env=env,
                          capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert proc.returncode != 0
    assert "VLLM_MAX_BATCH_SIZE" in proc.stderr and "'lots'" in proc.stderr


@pytest.mark.parametrize("seed", range(4))
def test_dynamic_batch_size_matches_original_on_random_lists(seed):
    rng = random.Random(seed)
    for _ in range(1000):
        n = rng.choice([0, 1, 2, 5, 49, 50, 51, rng.randint(0, 400)])
        reviews = [random_review(rng) for _ in range(n)]
        budget = rng.choice([None, 1, 7, 100, 4000, 8192, rng.randint(1, 10**6), 2**60 + 1])
        want = OriginalConfig.calculate_dynamic_batch_size(reviews, budget)
        assert batchgate.calculate_dynamic_batch_size(reviews, budget) == want
        assert Config.calculate_dynamic_batch_size(reviews, budget) == want
        assert Config.calculate_dynamic_batch_size(tuple(reviews), budget) == want


def test_dynamic_batch_size_edges():
    f = batchgate.calculate_dynamic_batch_size
    assert f([]) == 50
    assert f([""] * 10) == 100          # avg_tokens clamps to 1
    assert f(["a" * 3500]) == 10        # 1000 tokens each -> 4, clamped up to 10
    assert f(["가" * 140] * 60) == 100  # 40 tokens each -> 100
    # Only the first 50 count, as in the original: a long tail changes nothing.
    assert f(["a" * 35] * 50 + ["a" * 100000]) == f(["a" * 35] * 50)
    # Code points, not UTF-8 bytes or UTF-16 units.
    assert f(["😀" * 350]) == f(["a" * 350])


def test_dynamic_batch_size_follows_config_changes(monkeypatch):
    monkeypatch.setattr(Config, "VLLM_MAX_BATCH_SIZE", 30)
    monkeypatch.setattr(Config, "VLLM_MIN_BATCH_SIZE", 2)
    monkeypatch.setattr(OriginalConfig, "VLLM_MAX_BATCH_SIZE", 30)
    monkeypatch.setattr(OriginalConfig, "VLLM_MIN_BATCH_SIZE", 2)
    rng = random.Random(7)
    for _ in range(300):
        reviews = [random_review(rng) for _ in range(rng.randint(1, 80))]
        want = OriginalConfig.calculate_dynamic_batch_size(reviews)
        assert batchgate.calculate_dynamic_batch_size(reviews) == want


@pytest.mark.parametrize("bad, exc, words", [
    ("just one string", TypeError, "sequence of str"),
    (b"bytes", TypeError, "sequence of str"),
    (None, TypeError, "NoneType"),
    (42, TypeError, "int"),
    (["ok", None], TypeError, "content_list[1]"),
    (["ok", "ok", b"x"], TypeError, "content_list[2] must be str, not bytes"),
    ([1.5], TypeError, "content_list[0]"),
])
def test_dynamic_batch_size_bad_items(bad, exc, words):
    with pytest.raises(exc) as info:
        batchgate.calculate_dynamic_batch_size(bad)
    assert words in str(info.value)


def test_dynamic_batch_size_checks_items_past_the_sample():
    with pytest.raises(TypeError, match=r"content_list\[70\]"):
        batchgate.calculate_dynamic_batch_size(["x"] * 70 + [None])


@pytest.mark.parametrize("budget, exc", [
    (0, ValueError), (-5, ValueError), (4000.0, TypeError), ("4000", TypeError),
    (True, TypeError),
])
def test_dynamic_batch_size_bad_budget(budget, exc):
    with pytest.raises(exc, match="max_tokens_per_batch"):
        batchgate.calculate_dynamic_batch_size(["x"], budget)


# ---------------------------------------------------------------------------
# estimator

WEIGHTS = _native._estimator_weights


def test_features_match_reference_spec():
    rng = random.Random(11)
    specials = ["", " ", "  \t", "\n\n", "\ud800", "\U0010ffff", "\x00\x7f\x80", "é×÷ÿ",
                "Ωщ", "Ā", "　", "、。", "ｈｅｌｌｏ", "🇰🇷", "👨‍👩‍👧", "❤️", "漢字かなカナ",
                "\U00020000", "ㄱㅏ", "\u1100", "…", "\u200d"]
    samples = specials + [random_review(rng) for _ in range(3000)]
    # Every code point class boundary, in all three storage widths.
    for cp in [0x7F, 0xFF, 0x100, 0x24F, 0x250, 0x3FF, 0x4FF, 0x500, 0x7FF, 0x800, 0x1FFF,
               0x2000, 0x206F, 0x2070, 0x3000, 0x303F, 0x3040, 0xABFF, 0xAC00, 0xD7A3,
               0xD7A4, 0xFFFF, 0x10000, 0x1F000, 0x1FAFF, 0x1FB00, 0x3FFFF, 0x40000]:
        samples += [chr(cp), "a" + chr(cp) + "a", chr(cp) * 3 + " x"]
    for s in samples:
        assert _native._token_features(s) == token_features(s), repr(s)
        assert batchgate.estimate_tokens(s) == script_estimate(s, WEIGHTS), repr(s)
        assert batchgate.estimate_tokens(s, method="chars") == chars_estimate(s), repr(s)
    assert batchgate.estimate_many(samples) == [script_estimate(s, WEIGHTS) for s in samples]


def test_estimates_are_sane():
    assert batchgate.estimate_tokens("") == 0
    assert batchgate.estimate_tokens("a") == 1
    korean = "이 집 정말 맛있어요. 다음에 또 올게요!"
    assert 5 <= batchgate.estimate_tokens(korean) <= 40
    # Longer text never estimates fewer tokens.
    assert batchgate.estimate_tokens(korean * 10) >= batchgate.estimate_tokens(korean)
    assert batchgate.estimate_tokens("x" * 7, method="chars") == 2
    assert batchgate.estimate_tokens("x" * 8, method="chars") == 3


@pytest.mark.parametrize("args, exc, words", [
    ((None,), TypeError, "text must be str, not NoneType"),
    ((b"x",), TypeError, "bytes"),
    (("x", "words"), ValueError, "'script' or 'chars'"),
    (("x", 3), TypeError, "method"),
])
def test_estimate_bad_input(args, exc, words):
    with pytest.raises(exc) as info:
        batchgate.estimate_tokens(*args)
    assert words in str(info.value)


def test_estimate_many_names_bad_item():
    with pytest.raises(TypeError, match=r"texts\[2\] must be str, not int"):
        batchgate.estimate_many(["a", "b", 3])


# ---------------------------------------------------------------------------
# planner: the hard budget

def check_plan(texts, plan, budget, max_batch_size=None, overhead=0, tokens=None, pack=False):
    tokens = tokens if tokens is not None else batchgate.estimate_many(texts)
    indices = plan.indices
    assert len(indices) == len(plan) == len(plan.token_counts)
    flat = [i for batch in indices for i in batch]
    assert sorted(flat) == list(range(len(texts)))  # nothing lost or duplicated
    if not pack:
        assert flat == list(range(len(texts)))       # order kept, contiguous
    for b, batch in enumerate(indices):
        assert batch, "empty batch"
        assert batch == sorted(batch)
        assert [texts[i] for i in batch] == plan[b]
        total = overhead + sum(tokens[i] for i in batch)
        assert plan.token_counts[b] == total
        if len(batch) == 1 and batch[0] in plan.oversize:
            assert total > budget
            continue
        assert total <= budget
        if max_batch_size:
            assert len(batch) <= max_batch_size
    for i in plan.oversize:
        assert overhead + tokens[i] > budget


def min_contiguous_batches(tokens, budget, max_items, overhead):
    """Dynamic programming optimum, to show the greedy planner is optimal."""
    n = len(tokens)
    best = [0] + [math.inf] * n
    for j in range(1, n + 1):
        total = overhead
        for i in range(j - 1, -1, -1):
            total += tokens[i]
            if total > budget or (max_items and j - i > max_items):
                break
            best[j] = min(best[j], best[i] + 1)
    return best[n]


texts_strategy = st.lists(
    st.one_of(
        st.text(alphabet=st.sampled_from(list(KOREAN + ENGLISH + PUNCT + "".join(EMOJI))), max_size=120),
        st.text(max_size=40),
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(texts=texts_strategy, budget=st.integers(1, 400),
       max_batch_size=st.one_of(st.none(), st.integers(1, 12)),
       overhead=st.integers(0, 30), pack=st.booleans())
def test_plan_respects_budget_property(texts, budget, max_batch_size, overhead, pack):
    if overhead >= budget:
        overhead = budget - 1
    plan = batchgate.plan_batches(texts, budget, max_batch_size=max_batch_size,
                                  overhead_tokens=overhead, oversize="alone", pack=pack)
    check_plan(texts, plan, budget, max_batch_size, overhead, pack=pack)
    if not plan.oversize and not pack:
        tokens = batchgate.estimate_many(texts)
        assert len(plan) == min_contiguous_batches(tokens, budget, max_batch_size, overhead)


@settings(max_examples=300, deadline=None)
@given(counts=st.lists(st.integers(0, 60), max_size=120), budget=st.integers(1, 100),
       max_batch_size=st.one_of(st.none(), st.integers(1, 10)))
def test_plan_with_counts_property(counts, budget, max_batch_size):
    texts = [f"item{i}" for i in range(len(counts))]
    try:
        plan = batchgate.plan_batches(texts, budget, counts=counts, max_batch_size=max_batch_size)
    except ValueError as e:
        first = next(i for i, c in enumerate(counts) if c > budget)
        assert f"texts[{first}]" in str(e)
        return
    check_plan(texts, plan, budget, max_batch_size, tokens=counts)
    packed = batchgate.plan_batches(texts, budget, counts=counts, max_batch_size=max_batch_size,
                                    pack=True)
    check_plan(texts, packed, budget, max_batch_size, tokens=counts, pack=True)
    assert len(packed) <= len(plan) + 1 or not counts  # FFD is near the contiguous optimum


def test_plan_counter_and_chars_method():
    texts = ["a" * 10, "b" * 20, "c" * 30, "d" * 40]
    plan = batchgate.plan_batches(texts, 50, counter=len)
    assert plan == [["a" * 10, "b" * 20], ["c" * 30], ["d" * 40]]
    assert plan.token_counts == [30, 30, 40]
    chars = batchgate.plan_batches(texts, 15, method="chars")
    check_plan(texts, chars, 15, tokens=[chars_estimate(t) for t in texts])


def test_plan_oversize_error_and_alone():
    texts = ["short", "x" * 5000, "short too"]
    with pytest.raises(ValueError, match=r"texts\[1\] alone needs \d+ tokens") as info:
        batchgate.plan_batches(texts, 100)
    assert "oversize='alone'" in str(info.value)
    plan = batchgate.plan_batches(texts, 100, oversize="alone")
    assert plan == [["short"], ["x" * 5000], ["short too"]]
    assert plan.oversize == [1]
    assert plan.token_counts[1] > 100


def test_plan_packing_beats_contiguous_on_alternating_sizes():
    counts = [60, 60, 40, 40] * 5
    texts = [str(i) for i in range(len(counts))]
    contiguous = batchgate.plan_batches(texts, 100, counts=counts)
    packed = batchgate.plan_batches(texts, 100, counts=counts, pack=True)
    assert len(packed) == 10 < len(contiguous)
    check_plan(texts, packed, 100, tokens=counts, pack=True)


def test_plan_empty_and_defaults():
    assert batchgate.plan_batches([]) == []
    plan = batchgate.plan_batches(["맛있어요"] * 10)
    assert plan.budget == Config.VLLM_MAX_TOKENS_PER_BATCH
    assert plan == [["맛있어요"] * 10]


def test_plan_survives_counter_that_mutates_the_list():
    texts = ["a", "b", "c"]

    def counter(t):
        texts.clear()
        return 1

    plan = batchgate.plan_batches(texts, 10, counter=counter)
    assert plan == [["a", "b", "c"]]


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(texts=["a", None]), TypeError, "texts[1] must be str, not NoneType"),
    (dict(texts=["a", b"b"]), TypeError, "texts[1] must be str, not bytes"),
    (dict(texts="abc"), TypeError, "sequence of str"),
    (dict(texts=None), TypeError, "sequence of str"),
    (dict(max_tokens_per_batch=0), ValueError, "max_tokens_per_batch must be >= 1"),
    (dict(max_tokens_per_batch=-3), ValueError, "max_tokens_per_batch"),
    (dict(max_tokens_per_batch=10.5), TypeError, "max_tokens_per_batch must be an int"),
    (dict(max_batch_size=0), ValueError, "max_batch_size"),
    (dict(max_batch_size="5"), TypeError, "max_batch_size must be an int"),
    (dict(overhead_tokens=-1), ValueError, "overhead_tokens"),
    (dict(overhead_tokens=4000), ValueError, "leaves no room"),
    (dict(oversize="drop"), ValueError, "oversize"),
    (dict(method="bytes"), ValueError, "method"),
    (dict(counts=[1]), ValueError, "counts has 1 items but texts has 2"),
    (dict(counts=[1, -2]), ValueError, "counts[1] must be >= 0"),
    (dict(counts=[1, 2.0]), TypeError, "counts[1] must be an int"),
    (dict(counts=[1, True]), TypeError, "counts[1]"),
    (dict(counts=[1, 2**70]), ValueError, "counts[1] is too large"),
    (dict(counts="12"), TypeError, "counts must be a sequence of int"),
    (dict(counter=lambda t: "1"), TypeError, "counter(texts)[0] must be an int"),
    (dict(counter=5), TypeError, "counter must be callable"),
    (dict(counts=[1, 1], counter=len), TypeError, "not both"),
    (dict(pack=1), TypeError, "pack must be a bool"),
])
def test_plan_bad_input(kwargs, exc, words):
    args = dict(texts=["a", "b"], max_tokens_per_batch=4000)
    args.update(kwargs)
    texts = args.pop("texts")
    budget = args.pop("max_tokens_per_batch")
    with pytest.raises(exc) as info:
        batchgate.plan_batches(texts, budget, **args)
    assert words in str(info.value)


def test_counter_exception_propagates():
    def counter(t):
        raise RuntimeError("tokenizer exploded")

    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        batchgate.plan_batches(["a"], 10, counter=counter)


def test_plan_large_input_is_exact():
    rng = random.Random(3)
    texts = [random_review(rng) for _ in range(20000)]
    plan = batchgate.plan_batches(texts, 500, oversize="alone", max_batch_size=50)
    check_plan(texts, plan, 500, max_batch_size=50)
    packed = batchgate.plan_batches(texts, 500, oversize="alone", max_batch_size=50, pack=True)
    check_plan(texts, packed, 500, max_batch_size=50, pack=True)
    assert len(packed) <= len(plan)
