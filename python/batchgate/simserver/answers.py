"""Deterministic answers and token counts for the simulated server.

Answers depend only on the prompt text, so a run against the simulator is
reproducible. Prompts that ask for ``positive_count`` and ``negative_count``
(batchgate's built-in sentiment prompt) get a valid JSON answer whose counts
come from keyword rules over the reviews in the prompt:

- the reviews are the prompt's list items: a line starting "1. ", "2) ",
  "[3] ", "- ", "* " or "• " begins one, and the following lines up to the next
  item or a blank line continue it (a review with newlines stays one review);
  without list items, every non-empty line that does not mention the answer
  keys and does not end with ":" is one review;
- a review is positive when it has more positive than negative keyword hits,
  negative when it has more negative hits, and a tie is broken by a CRC of the
  text, so ``positive_count + negative_count`` always equals the number of
  reviews.

Any other prompt gets an echo-like text that names the prompt's size and
repeats its start.

Fault markers, for testing clients (put one anywhere in a prompt, e.g. inside a
review): ``[[sim:garbage]]`` makes the answer a non-JSON sentence,
``[[sim:error]]`` makes the request fail with HTTP 500; the ``-once`` forms
(``[[sim:garbage-once]]``, ``[[sim:error-once]]``) do so only the first time
the server sees that exact prompt, so a retry succeeds.
"""
from __future__ import annotations

import json
import math
import re
import zlib
from typing import Callable, List, Optional, Sequence, Tuple

try:  # the calibrated native estimator, when the package is built
    from batchgate.sizing import estimate_tokens as _native_estimate

    def _count(text: str) -> int:
        return _native_estimate(text)
except ImportError:  # pragma: no cover - only without the C extension
    def _count(text: str) -> int:
        return math.ceil(len(text) / 3.5)

count_tokens: Callable[[str], int] = _count

# Chat-template overhead per message (role markers) and for the reply header,
# roughly what Qwen2.5's template adds.
CHAT_TOKENS_PER_MESSAGE = 5
CHAT_REPLY_TOKENS = 3

_POSITIVE = (
    # Korean
    "맛있", "맛나", "좋", "추천", "만족", "최고", "친절", "훌륭", "괜찮", "또 올", "또 가",
    "재방문", "감사", "깔끔", "신선", "대박", "굿", "강추", "행복", "푸짐", "정성",
    # English
    "good", "great", "delicious", "tasty", "love", "excellent", "amazing", "awesome",
    "recommend", "friendly", "nice", "fresh", "perfect", "best",
    # emoji
    "👍", "😊", "😍", "❤", "🥰", "😋",
)
_NEGATIVE = (
    "안 좋", "안좋", "별로", "실망", "최악", "불친절", "비싸", "느리", "늦", "걸렸", "더럽", "불만", "아쉽",
    "아쉬", "다시는", "비추", "식었", "차갑", "짜요", "짰", "싱거", "불쾌", "엉망", "최저",
    "bad", "terrible", "awful", "slow", "rude", "cold", "expensive", "disappoint",
    "worst", "dirty", "never again", "bland", "overpriced",
    "👎", "😡", "😠", "🤮",
)

_POSITIVE_SET = frozenset(_POSITIVE)
# One pass over the text; longest keywords first so "불친절" is not read as "친절".
_KEYWORD = re.compile("|".join(
    re.escape(k) for k in sorted(_POSITIVE + _NEGATIVE, key=len, reverse=True)))
_ITEM = re.compile(r"^\s*(?:\d{1,6}\s*[.):]|\[\d{1,6}\]|[-*•])\s+(.*\S)")
_ANSWER_KEYS = ("positive_count", "negative_count")


def is_sentiment_prompt(prompt: str) -> bool:
    low = prompt.lower()
    return _ANSWER_KEYS[0] in low and _ANSWER_KEYS[1] in low


def review_lines(prompt: str) -> List[str]:
    """The reviews of a sentiment prompt, one per line (rules in the module doc)."""
    lines = prompt.splitlines()
    items: List[str] = []
    current: Optional[List[str]] = None
    for line in lines:
        m = _ITEM.match(line)
        if m:
            if current is not None:
                items.append("\n".join(current))
            current = [m.group(1)]
        elif current is not None:
            if line.strip():
                current.append(line)
            else:
                items.append("\n".join(current))
                current = None
    if current is not None:
        items.append("\n".join(current))
    if items:
        return items
    out = []
    for line in lines:
        s = line.strip()
        if not s or s.endswith(":"):
            continue
        low = s.lower()
        if _ANSWER_KEYS[0] in low or _ANSWER_KEYS[1] in low:
            continue
        out.append(s)
    return out


def classify(review: str) -> bool:
    """True when the review counts as positive."""
    hits = _KEYWORD.findall(review.lower())
    pos = sum(1 for h in hits if h in _POSITIVE_SET)
    neg = len(hits) - pos
    if pos != neg:
        return pos > neg
    return zlib.crc32(review.encode("utf-8")) & 1 == 0


def sentiment_answer(prompt: str) -> str:
    reviews = review_lines(prompt)
    positive = sum(1 for r in reviews if classify(r))
    return json.dumps({"positive_count": positive, "negative_count": len(reviews) - positive})


def echo_answer(prompt: str) -> str:
    head = " ".join(prompt.split())[:160]
    digest = zlib.crc32(prompt.encode("utf-8"))
    return f"Simulated reply #{digest:08x} to {len(prompt)} characters: {head}"


GARBAGE_ANSWER = "Sorry, I lost count of the reviews."
_FAULT = re.compile(r"\[\[sim:(garbage|error)(-once)?\]\]")


def fault_marker(prompt: str) -> Optional[Tuple[str, bool]]:
    """(kind, once) of the first fault marker in the prompt, or None."""
    if "[[sim:" not in prompt:
        return None
    m = _FAULT.search(prompt)
    return (m.group(1), m.group(2) is not None) if m else None


def answer_for(prompt: str) -> str:
    """The full (untruncated) answer to a prompt."""
    if is_sentiment_prompt(prompt):
        return sentiment_answer(prompt)
    return echo_answer(prompt)


def truncate(answer: str, answer_tokens: int, keep_tokens: int) -> str:
    """The answer cut to about ``keep_tokens`` of its ``answer_tokens``."""
    if keep_tokens >= answer_tokens:
        return answer
    return answer[: len(answer) * keep_tokens // answer_tokens]


def fit(answer: str, answer_tokens: int, tokens: int) -> str:
    """The answer cut or continued to about ``tokens`` tokens. Past its end
    (``min_tokens``, ``ignore_eos``, a drawn length) the text goes on repeating
    itself, as a model whose EOS is suppressed rambles on."""
    if tokens <= answer_tokens:
        return truncate(answer, answer_tokens, tokens)
    reps = -(-tokens // max(1, answer_tokens))
    text = "\n".join([answer] * reps)
    return truncate(text, count_tokens(text), tokens)


def chat_prompt(messages: Sequence[dict]) -> Tuple[str, int]:
    """Text to answer (the last user message) and the prompt's token count."""
    tokens = CHAT_REPLY_TOKENS
    last_user = ""
    for m in messages:
        content = m["content"]
        tokens += CHAT_TOKENS_PER_MESSAGE + count_tokens(content)
        if m["role"] == "user":
            last_user = content
    return last_user, tokens
