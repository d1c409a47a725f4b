"""How long the simulated model's free-text answers are.

A real model's answer length is a property of the prompt and the model, not of
``max_tokens``; a client that reserves ``max_tokens`` for every request
over-reserves, and one that guesses too low gets preempted. To let a
benchmark tell the two apart, the simulator draws the natural length of a
free-text answer (where the model would emit EOS) from a distribution:

- ``natural``: the length of the built-in echo answer (~20-60 tokens);
- ``fixed:N``: always N tokens;
- ``uniform:LO:HI``: uniform on [LO, HI];
- ``lognormal:MEAN:SIGMA``: log-normal with that mean (tokens) and SIGMA the
  standard deviation of the underlying normal (0.5 is a moderate spread, 1.0
  a heavy tail); long-tailed like real summaries.

The draw is seeded by ``seed`` and the prompt text only, so the same prompt
always gets the same length (runs are reproducible and a retried request is
not luckier than the first try). JSON answers to the sentiment prompt keep
their own length: they are what clients parse.
"""
from __future__ import annotations

import math
import random
import zlib
from typing import Optional

KINDS = ("natural", "fixed", "uniform", "lognormal")


class OutputLength:
    """A parsed ``--output-len`` spec; ``draw(text)`` gives a length or None
    (None = keep the answer's own length)."""

    __slots__ = ("kind", "a", "b", "seed", "_mu", "spec")

    def __init__(self, spec: str = "natural", seed: int = 0) -> None:
        if not isinstance(spec, str):
            raise TypeError(f"output_len must be a str such as 'lognormal:300:0.6', "
                            f"not {type(spec).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"output_len_seed must be an int, not {type(seed).__name__}")
        self.spec = spec
        self.seed = seed
        kind, *args = spec.strip().split(":")
        if kind not in KINDS:
            raise ValueError(f"output_len {spec!r}: kind must be one of {', '.join(KINDS)}")
        want = {"natural": 0, "fixed": 1, "uniform": 2, "lognormal": 2}[kind]
        if len(args) != want:
            raise ValueError(f"output_len {spec!r}: {kind} takes {want} number(s), "
                             f"e.g. {_EXAMPLES[kind]}")
        try:
            nums = [float(x) for x in args]
        except ValueError:
            raise ValueError(f"output_len {spec!r}: not a number in {args}") from None
        self.kind = kind
        self.a = nums[0] if nums else 0.0
        self.b = nums[1] if len(nums) > 1 else 0.0
        self._mu = 0.0
        if kind == "fixed" and not (self.a >= 1 and self.a.is_integer()):
            raise ValueError(f"output_len {spec!r}: N must be an integer >= 1")
        if kind == "uniform" and not (1 <= self.a <= self.b and self.a.is_integer()
                                      and self.b.is_integer()):
            raise ValueError(f"output_len {spec!r}: need integers 1 <= LO <= HI")
        if kind == "lognormal":
            if not (self.a >= 1 and math.isfinite(self.a)):
                raise ValueError(f"output_len {spec!r}: MEAN must be >= 1")
            if not (0 <= self.b <= 3):
                raise ValueError(f"output_len {spec!r}: SIGMA must be in [0, 3]")
            # E[exp(N(mu, s^2))] = exp(mu + s^2/2): pick mu so the mean is MEAN.
            self._mu = math.log(self.a) - self.b * self.b / 2

    def draw(self, text: str) -> Optional[int]:
        kind = self.kind
        if kind == "natural":
            return None
        if kind == "fixed":
            return int(self.a)
        rng = random.Random((self.seed << 32) ^ zlib.crc32(text.encode("utf-8", "replace")))
        if kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.lognormvariate(self._mu, self.b)))

    def __repr__(self) -> str:
        return f"OutputLength({self.spec!r}, seed={self.seed})"


_EXAMPLES = {"natural": "'natural'", "fixed": "'fixed:200'", "uniform": "'uniform:50:400'",
             "lognormal": "'lognormal:300:0.6'"}
