"""Plain-Python references the native code is checked against."""
from __future__ import annotations

import math

# ---- the original pipeline's formula, as it was written in pure Python ----

class OriginalConfig:
    VLLM_MAX_TOKENS_PER_BATCH = 4000
    VLLM_MIN_BATCH_SIZE = 10
    VLLM_MAX_BATCH_SIZE = 100
    VLLM_DEFAULT_BATCH_SIZE = 50

    @classmethod
    def calculate_dynamic_batch_size(cls, reviews, max_tokens_per_batch=None):
        if not reviews:
            return cls.VLLM_DEFAULT_BATCH_SIZE
        if max_tokens_per_batch is None:
            max_tokens_per_batch = cls.VLLM_MAX_TOKENS_PER_BATCH
        sample_size = min(50, len(reviews))
        sample = reviews[:sample_size]
        avg_chars = sum(len(r) for r in sample) / sample_size
        avg_tokens = max(1, int(avg_chars / 3.5))
        batch_size = max(1, int(max_tokens_per_batch / avg_tokens))
        return max(cls.VLLM_MIN_BATCH_SIZE, min(batch_size, cls.VLLM_MAX_BATCH_SIZE))


# ---- the script estimator's features, straight from the spec ----

HANGUL, CJK, LETTER, DIGIT, NEWLINE, SPACE, EMOJI, PUNCT, OTHER = range(9)


def _in(cp, ranges):
    return any(lo <= cp <= hi for lo, hi in ranges)


def cp_class(cp: int) -> int:
    if _in(cp, [(0xAC00, 0xD7A3), (0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F),
                (0xD7B0, 0xD7FF)]):
        return HANGUL
    if _in(cp, [(0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
                (0x20000, 0x3FFFF)]):
        return CJK
    if (_in(cp, [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF)])
            and cp not in (0xD7, 0xF7)):
        return LETTER
    if 0x30 <= cp <= 0x39:
        return DIGIT
    if cp == 0x0A:
        return NEWLINE
    if cp in (0x20, 0x09, 0x0D, 0x0B, 0x0C, 0xA0, 0x3000):
        return SPACE
    if _in(cp, [(0x1F000, 0x1FAFF), (0x2600, 0x27BF), (0x2B00, 0x2BFF), (0x200D, 0x200D),
                (0xFE00, 0xFE0F), (0xE0000, 0xE007F)]):
        return EMOJI
    if _in(cp, [(0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E), (0xA1, 0xBF),
                (0xD7, 0xD7), (0xF7, 0xF7), (0x2000, 0x206F), (0x3001, 0x303F),
                (0xFF00, 0xFFEF)]):
        return PUNCT
    return OTHER


def utf8_len(cp: int) -> int:
    return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4


def token_features(text: str) -> tuple:
    f = [0] * 12
    prev = None
    for ch in text:
        cp = ord(ch)
        c = cp_class(cp)
        run_start = c != prev
        if c == HANGUL:
            f[0] += 1
            f[1] += run_start
        elif c == CJK:
            f[2] += 1
        elif c == LETTER:
            f[3] += 1
            f[4] += run_start
        elif c == DIGIT:
            f[5] += 1
        elif c == PUNCT:
            f[6] += 1
            f[7] += run_start
        elif c == NEWLINE:
            f[8] += 1
        elif c == EMOJI:
            f[9] += 1
        elif c == OTHER:
            f[10] += utf8_len(cp)
        elif c == SPACE and not run_start:
            f[11] += 1
        # OTHER code points of different UTF-8 lengths are distinct classes in
        # C; runs of OTHER are never counted, so merging them here is exact.
        prev = c
    return tuple(f)


def script_estimate(text: str, weights) -> int:
    if not text:
        return 0
    milli = sum(w * x for w, x in zip(weights, token_features(text)))
    return max(1, math.ceil(milli / 1000))


def chars_estimate(text: str) -> int:
    return math.ceil(len(text) / 3.5) if text else 0
