"""The main job: sentiment counts per restaurant, batch by batch, through a vLLM server.

Reviews are grouped per restaurant and split into token-budgeted batches; each
batch becomes one prompt; answers ({positive_count, negative_count}) are checked
(integers that add up to the batch size) and summed per restaurant. Every
finished batch is appended to a batch log at once, so an interrupted run loses
nothing and ``--resume`` sends only the batches the log does not have.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._native import BatchgateError
from ._redact import redact, redact_url, secrets_of, split_userinfo
from .config import Config
from .dispatcher import Dispatcher
from .sizing import calculate_dynamic_batch_size, estimate_many, estimate_tokens, plan_batches

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
_PER_REVIEW_TOKENS = 4


class AnswerError(ValueError):
    """A model answer that is not a valid count for its batch."""


class ServerUnreachable(Exception):
    """No usable server at the given base URL."""


# ---- prompts and answers --------------------------------------------------------

def load_template(path: Optional[str]) -> str:
    """The built-in prompt, or a user template with a ``{reviews}`` placeholder
    (``{count}`` is also replaced; other braces are left alone)."""
    if path is None:
        return SENTIMENT_PROMPT
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if "{reviews}" not in text:
        raise ValueError(f"prompt template {path} has no {{reviews}} placeholder")
    return text


def _one_line(text: str) -> str:
    return " ".join(text.split())


def render_prompt(template: str, texts: Sequence[str]) -> str:
    body = "\n".join(f"{i}. {_one_line(t)}" for i, t in enumerate(texts, 1))
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


# ---- batches --------------------------------------------------------------------

@dataclass
class Batch:
    restaurant: str
    index: int                 # position within its restaurant
    texts: List[str]
    lines: List[int]           # input line numbers of the reviews
    tokens: int                # estimated prompt tokens (template included)
    key: str = ""

    def __post_init__(self) -> None:
        h = hashlib.sha256("\x1e".join(self.texts).encode("utf-8")).hexdigest()[:16]
        self.key = f"{self.restaurant}#{self.index}#{h}"


@dataclass
class BatchPlan:
    batches: List[Batch]
    oversize: List[Tuple[str, int]] = field(default_factory=list)  # (restaurant, line)


def build_batches(groups: Dict[str, List[Tuple[str, int]]], template: str, *,
                  sizing: str = "plan", max_tokens_per_batch: Optional[int] = None,
                  max_batch_size: Optional[int] = None, fixed_size: int = 50) -> BatchPlan:
    """Batches for ``groups`` ({restaurant: [(text, line), ...]}).

    ``sizing``: "plan" (batchgate's token-budget planner), "dynamic" (the
    original's average-based size per restaurant) or "fixed" (``fixed_size``).
    """
    budget = max_tokens_per_batch or Config.VLLM_MAX_TOKENS_PER_BATCH
    max_size = max_batch_size or Config.VLLM_MAX_BATCH_SIZE
    overhead = template_overhead(template, max_size)
    out = BatchPlan([])
    for rid, items in groups.items():
        texts = [t for t, _ in items]
        lines = [ln for _, ln in items]
        counts = [c + _PER_REVIEW_TOKENS for c in estimate_many([_one_line(t) for t in texts])]
        if sizing == "plan":
            plan = plan_batches(texts, budget, counts=counts, overhead_tokens=overhead,
                                max_batch_size=max_size, oversize="alone")
            spans = [list(ix) for ix in plan.indices]
            out.oversize.extend((rid, lines[i]) for i in plan.oversize)
        else:
            size = fixed_size if sizing == "fixed" else calculate_dynamic_batch_size(texts, budget)
            spans = [list(range(i, min(i + size, len(texts)))) for i in range(0, len(texts), size)]
        for b, ix in enumerate(spans):
            out.batches.append(Batch(rid, b, [texts[i] for i in ix], [lines[i] for i in ix],
                                     overhead + sum(counts[i] for i in ix)))
    return out


# ---- the batch log ----------------------------------------------------------------

class BatchLog:
    """Append-only JSONL, one record per finished batch, flushed at once.

    On resume, the latest record per batch key wins; a torn last line (the
    process was killed mid-write) is cut off before appending.
    """

    def __init__(self, path: Optional[str], resume: bool) -> None:
        self.path = path
        self.records: Dict[str, Dict[str, Any]] = {}
        self._f = None
        if path is None:
            return
        if resume and os.path.exists(path):
            good = 0
            with open(path, "rb") as f:
                data = f.read()
            for raw in data.splitlines(keepends=True):
                if not raw.endswith(b"\n"):
                    break
                try:
                    rec = json.loads(raw)
                    key = rec["key"]
                except (ValueError, KeyError, TypeError):
                    break
                self.records[key] = rec
                good += len(raw)
            if good < len(data):
                with open(path, "r+b") as f:
                    f.truncate(good)
        self._f = open(path, "a" if resume else "w", encoding="utf-8")

    def done(self, key: str) -> bool:
        rec = self.records.get(key)
        return rec is not None and rec.get("status") == "ok"

    def append(self, rec: Dict[str, Any]) -> None:
        self.records[rec["key"]] = rec
        if self._f is not None:
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# ---- dispatch ---------------------------------------------------------------------

def make_dispatcher(base_url: str, *, api_key: Optional[str] = None, model: Optional[str] = None,
                    max_concurrent: int, max_inflight_tokens: Optional[int] = None,
                    max_retries: int, timeout: float = 600.0, backoff: float = 0.5) -> Dispatcher:
    return Dispatcher(base_url, api_key, model, max_concurrent=max_concurrent,
                      max_inflight_tokens=max_inflight_tokens, max_retries=max_retries,
                      timeout=timeout, backoff=backoff)


@dataclass
class DispatchStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    prompt_tokens_est: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    peak_in_flight: int = 0
    peak_in_flight_tokens: Optional[int] = None
    token_cap: Optional[int] = None
    wall: float = 0.0
    interrupted: bool = False


class _PeakSampler:
    """Peak estimated tokens reserved under the token cap, sampled every few ms
    from the dispatcher's token semaphore (the engine keeps the request peak
    itself). Reserved = on the wire plus waiting there for a request slot, so
    it bounds the tokens on the wire from above; None without a token cap."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.peak: Optional[int] = None
        self._task: Optional[asyncio.Task] = None

    def sample(self) -> None:
        cap = self.d.max_inflight_tokens
        free = self.d.stats().get("tokens_free", -1)
        if cap and free >= 0:
            v = int(cap - free)
            self.peak = v if self.peak is None else max(self.peak, v)

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.005)

    def start(self) -> None:
        if self.d.max_inflight_tokens:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


async def dispatch_batches(dispatcher: Dispatcher, batches: Sequence[Batch], template: str, *,
                           log: BatchLog, max_retries: int, max_tokens: int = ANSWER_MAX_TOKENS,
                           params: Optional[Dict[str, Any]] = None,
                           window: Optional[int] = None, chat: bool = False,
                           progress: Optional[Callable[[DispatchStats], None]] = None,
                           stop: Optional[asyncio.Event] = None) -> DispatchStats:
    """Send each batch (one prompt), parse and log its answer. A batch whose
    answer is not a valid count is sent again up to ``max_retries`` times,
    then logged as failed. ``chat`` sends the prompt as one user message to
    /v1/chat/completions instead of /v1/completions. Setting ``stop`` cancels
    what is in flight; what finished is already in the log."""
    body = {"max_tokens": max_tokens, "temperature": 0.0}
    body.update(params or {})
    st = DispatchStats()
    sampler = _PeakSampler(dispatcher)
    t0 = time.monotonic()
    base_requests = dispatcher.stats().get("attempts", 0)

    async def one(b: Batch) -> None:
        prompt = render_prompt(template, b.texts)
        rec: Dict[str, Any] = {"key": b.key, "restaurant_id": b.restaurant, "batch": b.index,
                               "n_reviews": len(b.texts), "lines": [b.lines[0], b.lines[-1]],
                               "est_prompt_tokens": b.tokens}
        attempts = 0
        error = None
        for _ in range(max_retries + 1):
            try:
                if chat:
                    r = await dispatcher.chat([{"role": "user", "content": prompt}], **body)
                else:
                    r = await dispatcher.generate(prompt, **body)
            except (BatchgateError, UnicodeError) as e:
                # UnicodeError: a server message no decoder should have to
                # see; one bad batch must never abort the whole run.
                attempts += int(getattr(e, "attempts", 1) or 1)
                error = redact(f"{type(e).__name__}: {e}")
                break
            attempts += int(getattr(r, "attempts", 1) or 1)
            usage = r.usage or {}
            st.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            st.completion_tokens += int(usage.get("completion_tokens") or 0)
            try:
                pos, neg = parse_answer(r.text, len(b.texts))
            except AnswerError as e:
                error = f"unusable answer: {e}"
                continue
            rec.update(status="ok", positive_count=pos, negative_count=neg,
                       attempts=attempts, latency=round(r.latency, 4))
            st.ok += 1
            break
        if rec.get("status") != "ok":
            rec.update(status="failed", error=error, attempts=attempts)
            st.failed += 1
        log.append(rec)
        if progress is not None:
            progress(st)

    window = window or max(1024, 8 * dispatcher.max_concurrent)
    it = iter(batches)
    pending: set = set()
    failures: List[BaseException] = []
    loop = asyncio.get_running_loop()
    all_done = asyncio.Event()
    closing = asyncio.Event()  # set once we stop: no more batches are started

    def finished(t: "asyncio.Task[None]") -> None:
        # O(1) per batch: refill from the done callback, no re-wait on the whole set.
        pending.discard(t)
        if not t.cancelled() and t.exception() is not None:
            failures.append(t.exception())  # a bug in one(); surfaced below
            all_done.set()
            return
        fill()
        if not pending:
            all_done.set()

    def fill() -> None:
        while len(pending) < window and not closing.is_set():
            b = next(it, None)
            if b is None:
                return
            st.sent += 1
            st.prompt_tokens_est += b.tokens
            t = loop.create_task(one(b))
            pending.add(t)
            t.add_done_callback(finished)

    waiters = [loop.create_task(all_done.wait())]
    if stop is not None:
        waiters.append(loop.create_task(stop.wait()))
    sampler.start()
    try:
        fill()
        if pending:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        st.interrupted = stop is not None and stop.is_set() and not all_done.is_set()
    finally:
        closing.set()
        for w in waiters:
            w.cancel()
        for t in list(pending):
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await sampler.stop()
    if failures:
        raise failures[0]
    s = dispatcher.stats()
    st.requests = int(s.get("attempts", 0)) - int(base_requests)
    st.peak_in_flight = int(s.get("max_in_flight", 0))
    st.peak_in_flight_tokens = sampler.peak
    st.token_cap = dispatcher.max_inflight_tokens
    st.wall = time.monotonic() - t0
    return st


# ---- aggregation ------------------------------------------------------------------

def aggregate(groups: Dict[str, List[Tuple[str, int]]], batches: Sequence[Batch],
              log: BatchLog) -> List[Dict[str, Any]]:
    """Per-restaurant counts and ratios from the logged batches of this plan."""
    per: Dict[str, Dict[str, Any]] = {}
    for rid, items in groups.items():
        per[rid] = {"restaurant_id": rid, "reviews": len(items), "batches": 0,
                    "positive_count": 0, "negative_count": 0, "failed_batches": 0,
                    "unscored_reviews": 0}
    for b in batches:
        r = per[b.restaurant]
        r["batches"] += 1
        rec = log.records.get(b.key)
        if rec is not None and rec.get("status") == "ok":
            r["positive_count"] += rec["positive_count"]
            r["negative_count"] += rec["negative_count"]
        else:
            r["failed_batches"] += 1
            r["unscored_reviews"] += len(b.texts)
    out = []
    for r in per.values():
        scored = r["positive_count"] + r["negative_count"]
        r["positive_ratio"] = round(r["positive_count"] / scored, 4) if scored else None
        r["negative_ratio"] = round(r["negative_count"] / scored, 4) if scored else None
        r["complete"] = r["failed_batches"] == 0
        out.append(r)
    return out


# ---- embedded server ----------------------------------------------------------------

def preflight(base_url: str, api_key: Optional[str], timeout: float = 5.0
              ) -> Tuple[Optional[str], Optional[int]]:
    """GET {base_url}/models: the first model's id and max_model_len (vLLM
    lists it), or ServerUnreachable."""
    import urllib.error
    import urllib.request
    url, basic = split_userinfo(base_url)  # urllib takes no credentials from URLs
    shown = redact_url(base_url).rstrip("/")
    req = urllib.request.Request(url.rstrip("/") + "/models")
    if api_key or basic:
        req.add_header("Authorization", f"Bearer {api_key}" if api_key else basic)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        hint = (" (the base URL is the OpenAI-style one, ending in /v1)" if e.code == 404 else
                " (check VLLM_API_KEY)" if e.code in (401, 403) else "")
        raise ServerUnreachable(f"{shown}/models answered HTTP {e.code} "
                                f"{e.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = redact(str(getattr(e, "reason", e)), secrets_of(base_url) + (api_key,))
        raise ServerUnreachable(f"cannot reach the server at {shown}: {reason}") from None
    except ValueError:
        raise ServerUnreachable(f"{shown}/models did not return JSON; is this an "
                                "OpenAI-compatible server (base URL ending in /v1)?") from None
    try:
        first = data["data"][0]
        mml = first.get("max_model_len")
        return str(first["id"]), (mml if isinstance(mml, int) and mml > 0 else None)
    except (KeyError, IndexError, TypeError, AttributeError):
        return None, None


_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')
# Share of the server's KV cache that ``--max-inflight-tokens auto`` takes: block
# rounding and the answers' own tokens need the rest.
AUTO_TOKEN_CAP_FRACTION = 0.95


def server_kv_tokens(base_url: str, api_key: Optional[str], timeout: float = 5.0
                     ) -> Optional[int]:
    """The server's KV cache in tokens (num_gpu_blocks x block_size) from
    vLLM's ``vllm:cache_config_info`` metric at /metrics, or None."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit
    url, basic = split_userinfo(base_url)
    u = urlsplit(url)
    req = urllib.request.Request(f"{u.scheme}://{u.netloc}/metrics")
    if api_key or basic:
        req.add_header("Authorization", f"Bearer {api_key}" if api_key else basic)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    for m in _CACHE_INFO.finditer(text):
        labels = dict(_LABEL.findall(m.group(1)))
        try:
            blocks, size = int(labels["num_gpu_blocks"]), int(labels["block_size"])
        except (KeyError, ValueError):
            continue
        if blocks > 0 and size > 0:
            return blocks * size
    return None


# ---- progress -------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, already: int = 0, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.total = total
        self.already = already
        self.t0 = time.monotonic()
        self._last = 0.0

    def __call__(self, st: DispatchStats, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        done = self.already + st.ok + st.failed
        width = 30
        fill = int(width * done / self.total) if self.total else width
        rate = (st.ok + st.failed) / max(now - self.t0, 1e-9)
        self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} batches"
                          f"  {st.failed} failed  {rate:.1f} batches/s ")
        self.stream.flush()

    def finish(self, st: DispatchStats) -> None:
        if self.enabled:
            self(st, force=True)
            self.stream.write("\n")
            self.stream.flush()


# ---- the command ------------------------------------------------------------------------

def read_groups(path: str, text_field: str, group_field: str
                ) -> Tuple[Dict[str, List[Tuple[str, int]]], List[Exception]]:
    from .reviews import group_reviews, read_reviews
    errors: List[Any] = []
    groups = group_reviews(read_reviews(path, text_field=text_field, group_field=group_field,
                                        errors=errors))
    return {g: [(r.text, r.line) for r in rs] for g, rs in groups.items()}, errors


def _say(msg: str) -> None:
    print(f"batchgate: {msg}", file=sys.stderr, flush=True)


def run_command(args: Any) -> int:
    """``batchgate run``: exit 0 (all batches scored), 1 (some failed, or lines
    skipped with --strict), 2 (usage/input error), 3 (server unreachable),
    130 (interrupted; finished batches are in the batch log)."""
    try:
        return _run_command(args)
    except KeyboardInterrupt:
        _say("interrupted; finished batches are in the batch log, continue with --resume")
        return 130


def _run_command(args: Any) -> int:
    template = load_template(args.prompt_template)
    groups, errors = read_groups(args.file, args.text_field, args.group_field)
    for err in errors:
        _say(f"skipped line: {err}")
    n_reviews = sum(len(v) for v in groups.values())
    if not n_reviews:
        _say(f"no usable reviews in {args.file}")
        return 2
    plan = build_batches(groups, template, sizing="plan",
                         max_tokens_per_batch=args.max_tokens_per_batch,
                         max_batch_size=args.max_batch_size)
    for rid, line in plan.oversize:
        _say(f"review at line {line} ({rid}) alone exceeds the batch budget; sent alone")

    batch_log_path = args.batch_log or (args.out + ".batches.jsonl")
    if (not args.resume and not args.overwrite and os.path.exists(batch_log_path)
            and os.path.getsize(batch_log_path) > 0):
        _say(f"{batch_log_path} exists (an earlier run); use --resume to continue it or "
             "--overwrite to start over")
        return 2

    server = None
    base_url = args.base_url or os.getenv("VLLM_BASE_URL") or None
    api_key = os.getenv("VLLM_API_KEY") or None
    model = args.model or os.getenv("VLLM_MODEL") or None
    try:
        if base_url is None:
            from .simserver import SimServerThread
            server = SimServerThread(kv_cache_tokens=args.sim_kv_cache_tokens,
                                     max_model_len=args.sim_max_model_len,
                                     mode=args.sim_mode, step_base_s=0.002,
                                     step_per_token_s=2e-6)
            base_url = server.start() + "/v1"
            _say(f"no --base-url / VLLM_BASE_URL given: started the embedded simulated vLLM "
                 f"server at {base_url} (KV cache {args.sim_kv_cache_tokens} tokens, "
                 f"mode {args.sim_mode}); answers are simulated, not a real model's")
        try:
            served, max_model_len = preflight(base_url, api_key, timeout=args.connect_timeout)
        except ServerUnreachable as e:
            _say(f"error: {e}")
            return 3
        model = model or served
        biggest = max(b.tokens for b in plan.batches)
        if max_model_len and biggest + args.max_tokens > max_model_len:
            _say(f"warning: the largest batch ({biggest} estimated prompt tokens + "
                 f"{args.max_tokens} answer tokens) exceeds the server's max_model_len "
                 f"({max_model_len}); such batches will be rejected. Lower "
                 "--max-tokens-per-batch.")
        if args.max_inflight_tokens == "auto":
            kv = server_kv_tokens(base_url, api_key, timeout=args.connect_timeout)
            if kv is None:
                _say("error: --max-inflight-tokens auto: the server publishes no "
                     "vllm:cache_config_info at /metrics; give a number of tokens")
                return 2
            args.max_inflight_tokens = int(kv * AUTO_TOKEN_CAP_FRACTION)
            _say(f"token cap: {args.max_inflight_tokens} tokens in flight "
                 f"({AUTO_TOKEN_CAP_FRACTION:.0%} of the server's KV cache of {kv} tokens)")
        return _run(args, template, groups, plan, errors, batch_log_path, base_url, api_key,
                    model)
    finally:
        if server is not None:
            server.stop()


def _run(args: Any, template: str, groups: Dict[str, List[Tuple[str, int]]], plan: BatchPlan,
         errors: List[Any], batch_log_path: str, base_url: str, api_key: Optional[str],
         model: Optional[str]) -> int:
    log = BatchLog(batch_log_path, resume=args.resume)
    try:
        stale = set(log.records) - {b.key for b in plan.batches}
        todo = [b for b in plan.batches if not log.done(b.key)]
        skipped = len(plan.batches) - len(todo)
        if args.resume:
            _say(f"resume: {skipped} of {len(plan.batches)} batches already done in "
                 f"{batch_log_path}, {len(todo)} to send"
                 + (f"; {len(stale)} log records match no batch of this input/plan (ignored)"
                    if stale else ""))
        progress = Progress(len(plan.batches), skipped)

        async def main() -> DispatchStats:
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()

            def on_signal() -> None:
                _say("interrupted: cancelling batches in flight (Ctrl-C again to abort)")
                stop.set()
                loop.remove_signal_handler(signal.SIGINT)

            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, on_signal)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
            d = make_dispatcher(base_url, api_key=api_key, model=model,
                                max_concurrent=args.max_concurrent,
                                max_inflight_tokens=args.max_inflight_tokens,
                                max_retries=args.max_retries, timeout=args.timeout)
            try:
                return await dispatch_batches(d, todo, template, log=log,
                                              max_retries=args.max_retries,
                                              max_tokens=args.max_tokens, chat=args.chat,
                                              params=args.extra_body,
                                              progress=progress, stop=stop)
            finally:
                await d.aclose()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    try:
                        loop.remove_signal_handler(sig)
                    except (NotImplementedError, RuntimeError, ValueError):
                        pass

        st = asyncio.run(main())
        progress.finish(st)
    finally:
        log.close()

    results = aggregate(groups, plan.batches, log)
    failed = sum(r["failed_batches"] for r in results)
    if st.interrupted:
        done = sum(1 for b in plan.batches if log.done(b.key))
        _say(f"stopped: {done} of {len(plan.batches)} batches done and kept in "
             f"{batch_log_path}; {args.out} not written. Continue with --resume.")
        _print_summary(st, len(plan.batches), skipped, failed, n_reviews=None)
        return 130
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)
    n_reviews = sum(len(v) for v in groups.values())
    _print_summary(st, len(plan.batches), skipped, failed, n_reviews)
    print(f"results: {args.out} ({len(results)} restaurants); batch log: {batch_log_path}")
    if failed:
        for b in plan.batches:
            rec = log.records.get(b.key)
            if rec is None or rec.get("status") != "ok":
                err = rec.get("error") if rec else "not sent"
                _say(f"failed batch {b.restaurant} #{b.index} (lines {b.lines[0]}-"
                     f"{b.lines[-1]}, {len(b.texts)} reviews): {err}")
    return 1 if failed or (errors and args.strict) else 0


def _print_summary(st: DispatchStats, total: int, skipped: int, failed: int,
                   n_reviews: Optional[int]) -> None:
    rps = st.requests / st.wall if st.wall > 0 else 0.0
    if st.peak_in_flight_tokens is None:
        tok = "no token cap (--max-inflight-tokens)"
    else:
        tok = (f"peak {st.peak_in_flight_tokens} of {st.token_cap} estimated tokens reserved "
               "under the token cap (sampled every 5 ms)")
    lines = [
        f"batches:    {total} planned, {skipped} already done, {st.ok + st.failed} sent this "
        f"run ({st.ok} ok, {st.failed} failed); failed overall: {failed}",
        f"tokens:     {st.prompt_tokens_est} prompt (estimated), {st.prompt_tokens} prompt + "
        f"{st.completion_tokens} completion (server usage, all requests)",
        f"wall time:  {st.wall:.2f} s, {st.requests} requests, {rps:.1f} req/s",
        f"in flight:  peak {st.peak_in_flight} requests; {tok}",
    ]
    if n_reviews is not None:
        lines.insert(0, f"reviews:    {n_reviews}")
    print("\n".join(lines))
