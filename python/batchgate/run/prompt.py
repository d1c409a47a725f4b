"""The sentiment prompt and its answer: render a batch, check the counts."""
from __future__ import annotations

import json
import re
from typing import Optional, Sequence, Tuple

from ..sizing import estimate_tokens

# The original pipeline's prompt, in its style: count, answer JSON only. Review
# lines are numbered "1. ..."; instruction lines must not look like list items.
SENTIMENT_PROMPT = """다음은 한 음식점에 대한 고객 리뷰 {count}개입니다.
각 리뷰가 긍정적인지 부정적인지 판단하고, 긍정 리뷰와 부정 리뷰의 개수를 세어 주세요.

리뷰 목록:
{reviews}

다른 설명 없이 아래 JSON 형식으로만 답하세요. 두 값의 합은 리뷰 개수({count})와 같아야 합니다.
{"positive_count": 긍정 리뷰 수, "negative_count": 부정 리뷰 수}
"""

ANSWER_MAX_TOKENS = 64
# Tokens the numbering ("12. ") and newline add per review, on top of its text.
PER_REVIEW_TOKENS = 4


class AnswerError(ValueError):
    """A model answer that is not a valid count for its batch."""


def load_template(path: Optional[str]) -> str:
    """The built-in prompt, or a user template with a ``{reviews}`` placeholder
    (``{count}`` is also replaced; other braces are left alone)."""
    if path is None:
        return SENTIMENT_PROMPT
    with open(path, encoding="utf-8") as f:
        text = f.read()
    check_template(text, path)
    return text


def check_template(text: str, where: str = "prompt template") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str, not {type(text).__name__}")
    if "{reviews}" not in text:
        raise ValueError(f"{where} has no {{reviews}} placeholder")
    return text


def one_line(text: str) -> str:
    return " ".join(text.split())


def render_prompt(template: str, texts: Sequence[str]) -> str:
    body = "\n".join(f"{i}. {one_line(t)}" for i, t in enumerate(texts, 1))
    return template.replace("{count}", str(len(texts))).replace("{reviews}", body)


def template_overhead(template: str, max_batch_size: int) -> int:
    return estimate_tokens(template.replace("{count}", str(max_batch_size))
                           .replace("{reviews}", ""))


_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def parse_answer(text: str, n_reviews: int) -> Tuple[int, int]:
    """(positive, negative) from an answer; AnswerError says what is wrong."""
    s = _FENCE.sub("", text.strip())
    start = s.find("{")
    if start < 0:
        raise AnswerError(f"no JSON object in the answer: {text[:80]!r}")
    try:
        obj, _ = json.JSONDecoder().raw_decode(s, start)
    except ValueError as e:
        raise AnswerError(f"answer is not valid JSON ({e}): {text[:80]!r}") from None
    if not isinstance(obj, dict):
        raise AnswerError(f"answer is not a JSON object: {text[:80]!r}")
    counts = []
    for k in ("positive_count", "negative_count"):
        v = obj.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise AnswerError(f"{k} must be a non-negative integer, got {v!r}")
        counts.append(v)
    if counts[0] + counts[1] != n_reviews:
        raise AnswerError(f"positive_count + negative_count = {counts[0] + counts[1]}, "
                          f"but the batch has {n_reviews} reviews")
    return counts[0], counts[1]
