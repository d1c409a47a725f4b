"""OpenAI batch files through batchgate: ``batchgate batch IN.jsonl -o OUT.jsonl``.

Input lines are the OpenAI Batch / ``vllm run-batch`` format::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

with ``url`` = ``/v1/completions`` or ``/v1/chat/completions``. Each output line is::

    {"id": "batch_req_...", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "...", "body": <the server's JSON>},
     "error": null}

A server error (4xx, or 5xx after retries) is a ``response`` with that status and the
error body; a line that cannot be sent (invalid JSON, duplicate ``custom_id``, unknown
url, wrong method, invalid body) gets ``"response": null`` and an ``error`` with a
``code``, a ``message`` and the input ``line`` (1-based). Output lines come in the order
requests finish; join on ``custom_id``.

Resumable: every finished line is appended with one ``write`` as it finishes, so a
crash leaves whole lines plus at most one partial last line, which the next run cuts
off. Re-running with the same output sends only the lines it lacks. Requests that got
no answer at all (server unreachable, timeout) are not written: the next run sends them.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterator, List, Literal, Optional, Set, TextIO, Tuple,
                    Union)

from ._native import (BatchgateError, ClosedError, HTTPStatusError, MalformedResponseError,
                      TimeoutError, TransportError)
from .dispatcher import Dispatcher

__all__ = ["run_batch_file", "run_batch_file_sync", "BatchSummary", "BatchFileError",
           "SUPPORTED_URLS"]

SUPPORTED_URLS = ("/v1/completions", "/v1/chat/completions")

# error.code of lines rejected before sending; they carry the input line number.
INVALID_JSON = "invalid_json"
INVALID_REQUEST = "invalid_request"
INVALID_CUSTOM_ID = "invalid_custom_id"
DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
INVALID_METHOD = "invalid_method"
INVALID_URL = "invalid_url"
INVALID_BODY = "invalid_body"
# error.code of a request whose answer was not an OpenAI response (final, written).
MALFORMED_RESPONSE = "malformed_response"


class BatchFileError(ValueError):
    """The input or output file cannot be used as given (not a per-line problem)."""


@dataclass
class BatchSummary:
    """What one run did. ``written`` = ``succeeded + server_errors + invalid``."""
    lines: int = 0            # non-blank input lines
    already_done: int = 0     # lines whose output was already in the output file
    sent: int = 0             # requests submitted this run
    succeeded: int = 0        # answered 2xx
    server_errors: int = 0    # answered 4xx/5xx (after retries), or malformed
    invalid: int = 0          # rejected lines (own error line)
    no_answer: int = 0        # transport failure/timeout: not written, sent again next run
    not_sent: int = 0         # left unsent (interrupted, or the server looked down)
    repaired_bytes: int = 0   # partial last line cut from the output before resuming
    failed_before: int = 0    # error lines (any kind) already in the output
    elapsed: float = 0.0
    interrupted: bool = False
    last_transport_error: Optional[str] = None
    status_counts: Dict[int, int] = field(default_factory=dict)

    @property
    def written(self) -> int:
        return self.succeeded + self.server_errors + self.invalid

    @property
    def complete(self) -> bool:
        """Every input line has its output line."""
        return self.already_done + self.written == self.lines


# ---- input ----------------------------------------------------------------------------

@dataclass
class _Line:
    lineno: int
    custom_id: Optional[str]
    chat: bool = False
    payload: Any = None           # prompt (str | list of str) or messages list
    params: Optional[Dict[str, Any]] = None
    error: Optional[Tuple[str, str]] = None   # (code, message)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_body(url: str, body: Any) -> Tuple[Any, Dict[str, Any]]:
    """(payload, other body fields) or ValueError saying what is wrong."""
    if not isinstance(body, dict):
        raise ValueError(f"'body' must be a JSON object, not {_json_type(body)}")
    params = dict(body)
    model = params.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"'body.model' must be a string, not {_json_type(model)}")
    if params.get("stream") not in (None, False):
        raise ValueError("'body.stream' is not supported in a batch file")
    if url == "/v1/chat/completions":
        if "prompt" in params:
            raise ValueError("'body.prompt' belongs to /v1/completions; chat takes 'messages'")
        msgs = params.pop("messages", None)
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'body.messages' must be a non-empty list of message objects")
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"'body.messages[{k}]' must be an object with a string 'role'")
        return msgs, params
    if "messages" in params:
        raise ValueError("'body.messages' belongs to /v1/chat/completions; "
                         "completions take 'prompt'")
    prompt = params.pop("prompt", None)
    if isinstance(prompt, str):
        return prompt, params
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt, params
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, int) or isinstance(p, list) for p in prompt):
        raise ValueError("'body.prompt' as token ids is not supported; send text")
    raise ValueError("'body.prompt' must be a string or a non-empty list of strings, "
                     f"not {_json_type(prompt)}")


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array" if v else "an empty array"
    return "an object" if isinstance(v, dict) else type(v).__name__


def _parse_line(raw: bytes, lineno: int) -> _Line:
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        return _Line(lineno, None, error=(INVALID_JSON, f"not UTF-8 ({e.reason} at byte "
                                                       f"{e.start})"))
    except ValueError as e:
        return _Line(lineno, None, error=(INVALID_JSON, f"not valid JSON: {e}"))
    if not isinstance(obj, dict):
        return _Line(lineno, None, error=(INVALID_REQUEST, f"a line must be a JSON object, "
                                                          f"not {_json_type(obj)}"))
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return _Line(lineno, None, error=(INVALID_CUSTOM_ID, "'custom_id' must be a non-empty "
                                                            f"string, not {_json_type(cid)}"))
    line = _Line(lineno, cid)
    method = obj.get("method")
    if method != "POST":
        line.error = (INVALID_METHOD, f"'method' must be \"POST\", not {json.dumps(method)}")
        return line
    url = obj.get("url")
    if url not in SUPPORTED_URLS:
        line.error = (INVALID_URL, f"'url' {json.dumps(url)} is not supported; use one of "
                                   + ", ".join(SUPPORTED_URLS))
        return line
    try:
        line.payload, line.params = _check_body(url, obj.get("body"))
    except ValueError as e:
        line.error = (INVALID_BODY, str(e))
        return line
    line.chat = url == "/v1/chat/completions"
    return line


def _read_lines(path: str) -> Iterator[_Line]:
    """Every non-blank input line, parsed and checked; duplicates of an earlier
    ``custom_id`` (valid or not) come back as errors."""
    seen: Set[str] = set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = _parse_line(raw, lineno)
            cid = line.custom_id
            if cid is not None:
                if cid in seen:
                    line.error = (DUPLICATE_CUSTOM_ID,
                                  f"custom_id {json.dumps(cid, ensure_ascii=False)} "
                                  "already appeared on an earlier line")
                else:
                    seen.add(cid)
            yield line


# ---- output -------------------------------------------------------------------------

@dataclass
class _Done:
    ids: Set[str] = field(default_factory=set)     # custom_ids answered (any status)
    lines: Set[int] = field(default_factory=set)   # input lines rejected with their own error
    failed: int = 0                                # lines that are not a 2xx response


def _load_output(path: str) -> Tuple[_Done, int]:
    """What the output file already holds; cuts a partial last line (a crash
    mid-write) off the file. Returns (done, bytes cut)."""
    done = _Done()
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return done, 0
    with f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        cut = len(data) - end
        if cut:
            # Only the last line can be partial: each line is one append.
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    for n, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            cid = rec.get("custom_id")
            err = rec.get("error")
        except (ValueError, AttributeError):
            raise BatchFileError(f"{path} line {n} is not a batch output line; is it the "
                                 "output of another program? (overwrite starts over)"
                                 ) from None
        resp = rec.get("response")
        status = resp.get("status_code") if isinstance(resp, dict) else None
        if not (isinstance(status, int) and 200 <= status < 300):
            done.failed += 1
        if isinstance(err, dict) and isinstance(err.get("line"), int):
            done.lines.add(err["line"])
        elif isinstance(cid, str):
            done.ids.add(cid)
        else:
            raise BatchFileError(f"{path} line {n} has neither a custom_id nor an input line "
                                 "number; is it the output of another program?")
    return done, cut


class _Writer:
    """Appends whole lines, each with one write, to the output file."""

    def __init__(self, path: str, overwrite: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if overwrite else 0)
        self.fd = os.open(path, flags, 0o644)

    def write(self, rec: Dict[str, Any]) -> None:
        data = (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def _error_record(line: _Line) -> Dict[str, Any]:
    assert line.error is not None
    code, message = line.error
    return {"id": _new_id("batch_req_"), "custom_id": line.custom_id, "response": None,
            "error": {"code": code, "message": f"line {line.lineno}: {message}",
                      "line": line.lineno}}


def _response_record(custom_id: str, status: int, body: Any) -> Dict[str, Any]:
    rid = body.get("id") if isinstance(body, dict) else None
    return {"id": _new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": status,
                         "request_id": rid if isinstance(rid, str) else _new_id("req_"),
                         "body": body},
            "error": None}


def _http_error_body(e: HTTPStatusError) -> Dict[str, Any]:
    body = getattr(e, "body", None)  # the server's error JSON, when the dispatcher keeps it
    if isinstance(body, dict):
        return body
    return {"error": {"message": e.message, "type": "server_error" if e.status >= 500
                      else "invalid_request_error", "code": e.status}}


# ---- progress -------------------------------------------------------------------------

class _StderrProgress:
    """One status line on stderr: rewritten in place on a terminal, else a new
    line every few seconds."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = 0.2 if self.tty else 5.0
        self._last = time.monotonic()

    def __call__(self, s: BatchSummary, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.every:
            return
        self._last = now
        done = s.already_done + s.written
        rate = (s.succeeded + s.server_errors) / s.elapsed if s.elapsed > 0 else 0.0
        msg = (f"batchgate batch: {done}/{s.lines} lines done ({s.already_done} before), "
               f"{s.server_errors} server errors, {s.invalid} invalid, "
               f"{s.no_answer} no answer, {rate:.1f} req/s")
        if self.tty:
            self.stream.write("\r" + msg + ("\n" if final else ""))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()


ProgressArg = Union[bool, None, Callable[[BatchSummary], None]]


# ---- the run --------------------------------------------------------------------------

async def run_batch_file(input: str, output: str, *, base_url: Optional[str] = None,
                         api_key: Optional[str] = None, model: Optional[str] = None,
                         dispatcher: Optional[Dispatcher] = None,
                         max_concurrent: Optional[int] = None,
                         max_inflight_tokens: Optional[Union[int, Literal["auto"]]] = None,
                         max_retries: Optional[int] = None, timeout: Optional[float] = 600.0,
                         overwrite: bool = False, progress: ProgressArg = False,
                         window: Optional[int] = None,
                         max_consecutive_failures: Optional[int] = None,
                         stop: Optional[asyncio.Event] = None) -> BatchSummary:
    """Send every line of the batch file ``input`` and append its result to ``output``.

    Requests go through a ``Dispatcher`` (``dispatcher``, or one built from
    ``base_url``/``api_key``/``max_concurrent``/``max_inflight_tokens``/... and closed at
    the end). ``model`` is used for lines whose body has none; a line's own ``model``
    always wins. If ``output`` exists, lines it already answers are skipped (resume)
    unless ``overwrite``. ``progress``: True for a status line on stderr, or a callable
    given the running ``BatchSummary``. After ``max_consecutive_failures`` requests in a
    row without an answer (default: ``2 * max_concurrent``, at least 8) nothing more is
    sent: the server is taken to be down. Setting ``stop`` (an ``asyncio.Event``) ends
    the run early: nothing more is sent, requests in flight are cancelled, what has
    finished stays in ``output``, and the summary says ``interrupted``.
    """
    if os.path.abspath(input) == os.path.abspath(output):
        raise BatchFileError("the output file must not be the input file")
    if not os.path.isfile(input):
        raise BatchFileError(f"input file {input!r} does not exist or is not a file")
    t0 = time.monotonic()
    summary = BatchSummary()
    if overwrite:
        done = _Done()
    else:
        done, summary.repaired_bytes = _load_output(output)
        summary.failed_before = done.failed
    if done.ids:
        ours: Set[str] = set()
        for ln in _read_lines(input):
            if ln.custom_id is not None and ln.error is None:
                ours.add(ln.custom_id)
        stale = done.ids - ours
        if stale:
            ex = sorted(stale)[0]
            raise BatchFileError(
                f"{output} holds results for {len(stale)} custom_id(s) that are not requests "
                f"in {input} (e.g. {ex!r}): a different batch? Start over with overwrite "
                "(--overwrite), or use another output file")

    report: Optional[Callable[..., None]]
    if progress is True:
        report = _StderrProgress()
    elif callable(progress):
        report = progress
    else:
        report = None

    own = dispatcher is None
    if dispatcher is None:
        # base_url/api_key: the arguments, else VLLM_* / OPENAI_* from the environment.
        dispatcher = Dispatcher(base_url, api_key, model, max_concurrent=max_concurrent,
                                max_inflight_tokens=max_inflight_tokens,
                                max_retries=max_retries, timeout=timeout)
    d = dispatcher
    # One view per model named by lines: the request uses the line's model, and the
    # dispatcher never has to pick one from the server's list.
    views: Dict[str, Dispatcher] = {}

    def target(line_model: Optional[str]) -> Dispatcher:
        if line_model is None:
            return d if model is None else target(model)
        v = views.get(line_model)
        if v is None:
            if len(views) >= 1024:
                views.clear()
            v = views[line_model] = d.with_options(model=line_model)
        return v

    if window is None:
        window = 2 * d.max_concurrent + 16
    breaker = max_consecutive_failures or max(8, 2 * d.max_concurrent)
    try:
        writer = _Writer(output, overwrite)
    except BaseException:
        if own:
            d.close()
        raise
    slots = asyncio.Semaphore(window)
    tasks: Set["asyncio.Task[None]"] = set()
    consecutive = 0
    server_down = False

    def tick() -> None:
        summary.elapsed = time.monotonic() - t0
        if report is not None:
            report(summary)

    async def send(line: _Line) -> None:
        nonlocal consecutive, server_down
        assert line.custom_id is not None and line.params is not None
        params = line.params
        via = target(params.get("model"))
        try:
            # extra_body: every field goes to the server as written (a body field named
            # like an option, e.g. "timeout", stays a body field); raw: the server's JSON.
            if line.chat:
                result = await via.chat(line.payload, extra_body=params, raw=True)
            else:
                result = await via.generate(line.payload, extra_body=params, raw=True)
        except HTTPStatusError as e:
            consecutive = 0
            writer.write(_response_record(line.custom_id, e.status, _http_error_body(e)))
            summary.server_errors += 1
            summary.status_counts[e.status] = summary.status_counts.get(e.status, 0) + 1
        except MalformedResponseError as e:
            consecutive = 0
            writer.write({"id": _new_id("batch_req_"), "custom_id": line.custom_id,
                          "response": None,
                          "error": {"code": MALFORMED_RESPONSE, "message": str(e)}})
            summary.server_errors += 1
        except (TransportError, TimeoutError, ClosedError) as e:
            summary.no_answer += 1
            summary.last_transport_error = str(e)
            consecutive += 1
            if consecutive >= breaker:
                server_down = True
        except asyncio.CancelledError:
            if not summary.interrupted:
                raise
            summary.sent -= 1
            summary.not_sent += 1
            return
        except (TypeError, ValueError) as e:  # a body the dispatcher refuses to send
            line.error = (INVALID_BODY, str(e))
            writer.write(_error_record(line))
            summary.invalid += 1
        else:
            consecutive = 0
            writer.write(_response_record(line.custom_id, 200, result.raw))
            summary.succeeded += 1
            summary.status_counts[200] = summary.status_counts.get(200, 0) + 1
        tick()

    def finished(t: "asyncio.Task[None]") -> None:
        tasks.discard(t)
        slots.release()

    async def watch_stop() -> None:
        assert stop is not None
        await stop.wait()
        summary.interrupted = True
        for t in list(tasks):
            t.cancel()
        slots.release()  # wake the feeder if it waits for a slot

    watcher = asyncio.ensure_future(watch_stop()) if stop is not None else None
    try:
        try:
            for line in _read_lines(input):
                summary.lines += 1
                if line.error is not None:
                    if line.lineno in done.lines:
                        summary.already_done += 1
                    else:
                        writer.write(_error_record(line))
                        summary.invalid += 1
                    continue
                assert line.custom_id is not None
                if line.custom_id in done.ids or line.lineno in done.lines:
                    summary.already_done += 1
                    continue
                if server_down or summary.interrupted:
                    summary.not_sent += 1
                    continue
                await slots.acquire()
                if server_down or summary.interrupted:
                    slots.release()
                    summary.not_sent += 1
                    continue
                summary.sent += 1
                t = asyncio.ensure_future(send(line))
                tasks.add(t)
                t.add_done_callback(finished)
                tick()
            if tasks:
                pending = set(tasks)
                await asyncio.wait(pending)
                for t in pending:
                    if t.cancelled():  # stopped before it ever ran
                        summary.sent -= 1
                        summary.not_sent += 1
                    elif t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
        except asyncio.CancelledError:
            summary.interrupted = True
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            summary.elapsed = time.monotonic() - t0
            writer.close()
            if own:
                await d.aclose()
    finally:
        if report is not None:
            if isinstance(report, _StderrProgress):
                report(summary, final=True)
            else:
                report(summary)
    return summary


def run_batch_file_sync(input: str, output: str, **kwargs: Any) -> BatchSummary:
    """``run_batch_file`` for code without an event loop (same arguments)."""
    return asyncio.run(run_batch_file(input, output, **kwargs))


# ---- command line ---------------------------------------------------------------------

def add_parser(sub: Any) -> None:
    """The ``batchgate batch`` subcommand (``sub``: argparse subparsers)."""
    p = sub.add_parser(
        "batch", help="run an OpenAI batch file (JSONL) through a running vLLM server",
        description="Send every request of an OpenAI Batch / vllm run-batch input file "
        "(lines with custom_id, method, url = /v1/completions or /v1/chat/completions, body) "
        "to an OpenAI-compatible server and write the OpenAI batch output format, one line "
        "per request as it finishes. Re-running with the same output sends only what it "
        "lacks. Exit codes: 0 all lines answered 2xx, 1 some error lines (invalid lines, "
        "4xx/5xx), 2 bad input/output file, 3 some requests got no answer (re-run to send "
        "them), 130 interrupted.")
    p.add_argument("input", help="batch input file (.jsonl)")
    p.add_argument("-o", "--output", required=True, help="batch output file (.jsonl); "
                   "appended to when it exists (resume)")
    p.add_argument("--base-url", help="OpenAI-compatible base URL, e.g. "
                   "http://127.0.0.1:8000/v1 (default: $VLLM_BASE_URL, else $OPENAI_BASE_URL);"
                   " API key from $VLLM_API_KEY or $OPENAI_API_KEY")
    p.add_argument("--model", help="model for lines whose body has none (a line's own "
                   "model always wins)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="requests in flight at most (default: VLLM_MAX_CONCURRENT_BATCHES)")
    p.add_argument("--max-inflight-tokens", default=None,
                   help="cap on estimated prompt + max_tokens in flight: a number, or 'auto' "
                   "= 95%% of the server's KV cache from vLLM's /metrics")
    p.add_argument("--max-retries", type=int, default=None,
                   help="retries per request for 408/429/5xx and transport errors "
                   "(default: MAX_RETRIES)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: truncate the output instead of resuming")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=batch_command)


def _say(msg: str) -> None:
    print(f"batchgate batch: {msg}", file=sys.stderr, flush=True)


def batch_command(args: Any) -> int:
    from ._signals import stop_on_signals
    from .run import AUTO_TOKEN_CAP_FRACTION, server_kv_tokens
    from ._options import resolve_connection
    try:
        base_url, api_key = resolve_connection(args.base_url, None)
    except ValueError as e:
        _say(f"error: {e}")
        return 2
    cap: Optional[int] = None
    if args.max_inflight_tokens not in (None, "", "none", "0"):
        if args.max_inflight_tokens == "auto":
            kv = server_kv_tokens(base_url, api_key)
            if kv is None:
                _say("error: --max-inflight-tokens auto: the server publishes no "
                     "vllm:cache_config_info at /metrics; give a number")
                return 2
            cap = int(kv * AUTO_TOKEN_CAP_FRACTION)
        else:
            try:
                cap = int(args.max_inflight_tokens)
            except ValueError:
                _say(f"error: --max-inflight-tokens must be a number or 'auto', "
                     f"not {args.max_inflight_tokens!r}")
                return 2

    async def main() -> BatchSummary:
        with stop_on_signals(_say, "interrupted: stopping; finished lines stay in the output "
                                   "(Ctrl-C again to abort)") as stop:
            return await run_batch_file(
                args.input, args.output, base_url=base_url, api_key=api_key, model=args.model,
                max_concurrent=args.max_concurrent, max_inflight_tokens=cap,
                max_retries=args.max_retries, timeout=args.timeout, overwrite=args.overwrite,
                progress=not args.quiet, stop=stop)

    try:
        s = asyncio.run(main())
    except BatchFileError as e:
        _say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _say(f"aborted; finished lines are in {args.output}: run the same command to continue")
        return 130
    if s.repaired_bytes:
        _say(f"cut a partial last line ({s.repaired_bytes} bytes, an interrupted write) off "
             f"{args.output}")
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(s.status_counts.items()))
    print(f"{s.lines} lines: {s.already_done} already in {args.output}, {s.written} written "
          f"now ({s.succeeded} ok, {s.server_errors} server errors, {s.invalid} invalid lines)"
          f"; {s.sent} requests in {s.elapsed:.2f} s"
          + (f"; HTTP status {codes}" if codes else ""))
    if s.interrupted:
        _say(f"stopped: {s.not_sent + s.no_answer} lines not done; run the same command "
             "to continue")
        return 130
    if not s.complete:
        why = f" (last error: {s.last_transport_error})" if s.last_transport_error else ""
        _say(f"{s.no_answer + s.not_sent} lines got no answer and are not in {args.output}"
             f"{why}; run the same command again to send them")
        return 3
    return 0 if s.invalid + s.server_errors + s.failed_before == 0 else 1
