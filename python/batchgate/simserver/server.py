"""SimServer: the OpenAI-compatible routes of vLLM over the simulated engine.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
POST /tokenize (vLLM's, at the server root), GET /health, GET /version, GET /metrics (Prometheus text, vLLM's metric names),
GET /debug/timeline[?since=SECONDS], GET /debug/stats, POST /debug/reset.
Errors use vLLM's shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple, overload

from . import answers
from .engine import E2E_BUCKETS, Engine, OutOfMemory, Sequence
from .lengths import OutputLength
from .http import HttpProtocol, Request, Response, json_response

DEFAULT_MODEL = "sim-qwen2.5-7b"
MAX_N = 128
# Step-time model defaults (seconds): the real vLLM CPU tier's step as fitted by
# benchmarks/calibrate_simserver.py (tiny Qwen2, 2 shared cores; see the README).
STEP_BASE_S = 0.010
STEP_PREFILL_TOKEN_S = 0.000014
STEP_DECODE_SEQ_S = 0.0005


class ApiError(Exception):
    """An error answered with vLLM's error JSON."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError",
                 param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.param = param

    def response(self) -> Response:
        return error_response(str(self), self.status, self.err_type, self.param)


def error_response(message: str, status: int, err_type: str, param: Optional[str]) -> Response:
    return json_response(status, {"error": {"message": message, "type": err_type,
                                            "param": param, "code": status}})


@overload
def _int_field(body: Dict[str, Any], name: str, default: int, minimum: int,
               maximum: Optional[int] = None) -> int: ...
@overload
def _int_field(body: Dict[str, Any], name: str, default: None, minimum: int,
               maximum: Optional[int] = None) -> Optional[int]: ...
def _int_field(body: Dict[str, Any], name: str, default: Optional[int], minimum: int,
               maximum: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():  # pydantic accepts 16.0 too
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"{name} must be an integer, got {json.dumps(value)[:40]}", param=name)
    if value < minimum:
        raise ApiError(f"{name} must be at least {minimum}, got {value}.", param=name)
    if maximum is not None and value > maximum:
        raise ApiError(f"{name} must be at most {maximum}, got {value}.", param=name)
    return value


_TRUE = frozenset(("1", "on", "t", "true", "y", "yes"))
_FALSE = frozenset(("0", "off", "f", "false", "n", "no"))


def _bool_field(body: Dict[str, Any], name: str) -> bool:
    """A boolean as vLLM's pydantic models take it (lax: also 0/1 and yes/no strings)."""
    value = body.get(name)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ApiError(f"{name}: Input should be a valid boolean, got {json.dumps(value)[:40]}",
                   param=name)


def _message_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise ApiError(f"messages[{index}].content: only text parts are supported",
                               param="messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(f"messages[{index}].content must be a string or a list of parts",
                   param="messages")


async def finish_accepts() -> None:
    """Wait (up to ~100 s) for the asyncio tasks that are making accepted
    connections into transports; call right before Server.close(), in the same
    step, so none is made after it (see SimServer.stop)."""
    me = asyncio.current_task()
    for _ in range(100):
        setup = [t for t in asyncio.all_tasks() if t is not me and
                 getattr(t.get_coro(), "__name__", "") == "_accept_connection2"]
        if not setup:
            return
        await asyncio.wait(setup, timeout=1)


class SimServer:
    """A local vLLM look-alike that models KV-cache memory (see the package doc)."""

    def __init__(self, *, kv_cache_tokens: int = 131072, block_size: int = 16,
                 max_model_len: int = 32768, max_num_seqs: int = 256,
                 max_num_batched_tokens: Optional[int] = None, mode: str = "preempt",
                 step_base_s: float = STEP_BASE_S,
                 step_prefill_token_s: Optional[float] = None,
                 step_decode_seq_s: Optional[float] = None,
                 step_per_token_s: Optional[float] = None,
                 output_len: str = "natural", output_len_seed: int = 0,
                 model: str = DEFAULT_MODEL, timeline_interval_s: float = 0.005,
                 timeline_max_samples: int = 100_000) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        self.model = model
        # step_per_token_s is the older one-rate model: every token of a step,
        # prefilled or decoded, costs the same. It is the default of both rates.
        if step_prefill_token_s is None:
            step_prefill_token_s = (STEP_PREFILL_TOKEN_S if step_per_token_s is None
                                    else step_per_token_s)
        if step_decode_seq_s is None:
            step_decode_seq_s = (STEP_DECODE_SEQ_S if step_per_token_s is None
                                 else step_per_token_s)
        self.output_len = OutputLength(output_len, output_len_seed)
        self.engine = Engine(
            kv_cache_tokens=kv_cache_tokens, block_size=block_size,
            max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, mode=mode,
            step_base_s=step_base_s, step_prefill_token_s=step_prefill_token_s,
            step_decode_seq_s=step_decode_seq_s,
            timeline_interval_s=timeline_interval_s,
            timeline_max_samples=timeline_max_samples)
        self.max_model_len = max_model_len
        self.mode = mode
        self.host: Optional[str] = None
        self.port: Optional[int] = None
        self.created = int(time.time())
        self._server: Optional[asyncio.base_events.Server] = None
        self._connections: Set[HttpProtocol] = set()
        self._next_id = 0
        self._faults_seen: Set[Tuple[str, str]] = set()  # "-once" markers already applied
        self.num_bad_requests = 0
        # /tokenize: answered at once unless tests slow it down; counted so a
        # client's cache can be checked from the server side.
        self.tokenize_delay_s = 0.0
        self.num_tokenize_requests = 0
        self.tokenize_in_flight = 0
        self.tokenize_peak = 0
        self._routes = {
            ("POST", "/tokenize"): self._tokenize,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._chat_completions,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/version"): self._version,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/debug/timeline"): self._timeline,
            ("GET", "/debug/stats"): self._stats,
            ("POST", "/debug/reset"): self._reset,
        }
        self._paths = {path for _, path in self._routes}

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on host:port (0 = a free port); return the port."""
        if self._server is not None:
            raise RuntimeError("SimServer is already started")
        loop = asyncio.get_running_loop()
        self.engine.start()
        try:
            self._server = await loop.create_server(
                lambda: HttpProtocol(self._dispatch, self._connections),
                host, port, backlog=2048, reuse_address=True)
        except BaseException:
            await self.engine.stop()
            raise
        sock = self._server.sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        self.engine.reset_stats()
        return self.port

    async def stop(self) -> None:
        """Stop listening, close connections, cancel requests in progress."""
        if self._server is None:
            return
        # Connections the listener accepted are made into transports by
        # asyncio's own tasks; one made after close() fails an assert in
        # Server._attach and is left half-made to the GC, which then warns of an
        # unclosed transport and socket (3.13: and raises in its __del__) inside
        # some later test. So let those tasks finish first, then close in the
        # same step, before the listener can accept again.
        await finish_accepts()
        self._server.close()
        for conn in list(self._connections):
            conn.close()
        if hasattr(self._server, "close_clients"):  # 3.13+: also connections
            self._server.close_clients()  # accepted but not yet made
        await self._server.wait_closed()
        self._server = None
        await self.engine.stop()

    async def __aenter__(self) -> "SimServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """http://host:port (the OpenAI client's base_url is this plus /v1)."""
        if self.port is None:
            raise RuntimeError("SimServer is not started")
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}"

    # -- programmatic access (call on the server's loop) -------------------------------

    def timeline(self, since: float = -1.0) -> Dict[str, Any]:
        """KV usage / running / waiting samples (seconds since start or reset)."""
        tl = self.engine.timeline
        out: Dict[str, Any] = {"model": self.model, "mode": self.mode,
                               "interval_s": tl.interval_s}
        out.update(tl.snapshot(since))
        return out

    def stats(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self.engine.stats())
        out.update(mode=self.mode, num_blocks=self.engine.num_blocks,
                   block_size=self.engine.block_size, max_model_len=self.max_model_len,
                   max_num_seqs=self.engine.max_num_seqs,
                   num_bad_requests=self.num_bad_requests,
                   num_tokenize_requests=self.num_tokenize_requests,
                   tokenize_peak=self.tokenize_peak)
        return out

    def reset_stats(self) -> None:
        """Zero counters, peaks and the timeline (between demo scenarios)."""
        self.engine.reset_stats()
        self.num_bad_requests = 0
        self.num_tokenize_requests = 0
        self.tokenize_peak = 0

    # -- dispatch -----------------------------------------------------------------

    def _dispatch(self, req: Request):
        handler = self._routes.get((req.method, req.path))
        if handler is not None:
            return handler(req)
        if req.path in self._paths:
            allowed = ", ".join(m for m, p in self._routes if p == req.path)
            return json_response(405, {"detail": "Method Not Allowed"}, (("allow", allowed),))
        return json_response(404, {"detail": "Not Found"})

    def _json_body(self, req: Request) -> Dict[str, Any]:
        try:
            body = json.loads(req.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(f"Invalid JSON body: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(f"The request body must be a JSON object, not {type(body).__name__}")
        model = body.get("model")
        if model is not None and model != self.model:
            raise ApiError(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")
        if body.get("stream"):
            raise ApiError("stream=true is not supported by the simulated server",
                           param="stream")
        return body

    def _check_length(self, prompt_tokens: int, max_tokens: Optional[int]) -> None:
        # Same checks and messages as vLLM's OpenAIServing._validate_input.
        mml = self.max_model_len
        if prompt_tokens >= mml:
            raise ApiError(
                f"This model's maximum context length is {mml} tokens. However, your "
                f"request has {prompt_tokens} input tokens. Please reduce the length of "
                f"the input messages.", param="input_tokens")
        if max_tokens is not None and prompt_tokens + max_tokens > mml:
            raise ApiError(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. "
                f"This model's maximum context length is {mml} tokens and your request "
                f"has {prompt_tokens} input tokens ({max_tokens} > {mml} - "
                f"{prompt_tokens}).", param="max_tokens")

    def _bad(self, e: ApiError) -> Response:
        if e.status < 500:
            self.num_bad_requests += 1
        return e.response()

    # -- generation -----------------------------------------------------------------

    def _plan(self, body: Dict[str, Any], texts: List[str], prompt_tokens: List[int],
              max_tokens: Optional[int], n: int) -> List[Tuple[str, int, Sequence]]:
        """Validate every prompt, then create its n sequences (not yet submitted)."""
        for pt in prompt_tokens:
            self._check_length(pt, max_tokens)
        ignore_eos = _bool_field(body, "ignore_eos")
        min_tokens = _int_field(body, "min_tokens", 0, -(1 << 62))
        # vLLM's SamplingParams checks (no param in the error, as there).
        if min_tokens < 0:
            raise ApiError(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
        loop = asyncio.get_running_loop()
        plan = []
        for text, pt in zip(texts, prompt_tokens):
            limit = max_tokens if max_tokens is not None else self.max_model_len - pt
            if min_tokens > limit:
                raise ApiError(f"min_tokens must be less than or equal to max_tokens="
                               f"{limit}, got {min_tokens}.")
        for text, pt in zip(texts, prompt_tokens):
            fault = self._fault(text)
            if fault == "error":
                raise ApiError("Simulated failure requested by a [[sim:error]] marker "
                               "in the prompt", 500, "InternalServerError")
            answer = answers.GARBAGE_ANSWER if fault else answers.answer_for(text)
            answer_tokens = max(1, answers.count_tokens(answer))
            # Where the model would stop by itself (EOS).
            natural = answer_tokens
            if not fault and not answers.is_sentiment_prompt(text):
                drawn = self.output_len.draw(text)
                if drawn is not None:
                    natural = drawn
            limit = max_tokens if max_tokens is not None else self.max_model_len - pt
            # min_tokens suppresses EOS until that many tokens; ignore_eos always.
            stop_at = limit if ignore_eos else max(natural, min_tokens)
            target = min(limit, stop_at)
            reason = "stop" if target == stop_at and not ignore_eos else "length"
            shown = answers.fit(answer, answer_tokens, target)
            for _ in range(n):
                plan.append((shown, pt, Sequence(pt, target, reason, loop.create_future())))
        return plan

    def _fault(self, text: str) -> Optional[str]:
        marker = answers.fault_marker(text)
        if marker is None:
            return None
        kind, once = marker
        if once:
            key = (kind, text)
            if key in self._faults_seen:
                return None
            self._faults_seen.add(key)
        return kind

    async def _generate(self, plan: List[Tuple[str, int, Sequence]]) -> Optional[Response]:
        """Run the sequences; None when all finished, else the error response."""
        engine = self.engine
        for _, _, seq in plan:
            engine.submit(seq)
        futures = [seq.future for _, _, seq in plan]
        try:
            for fut in futures:
                await fut
        except OutOfMemory as e:
            for fut, (_, _, seq) in zip(futures, plan):
                if not fut.done():
                    engine.abort(seq)
                    fut.cancel()
            return error_response(str(e), 500, "InternalServerError", None)
        except asyncio.CancelledError:  # the client went away
            for _, _, seq in plan:
                engine.abort(seq)
            raise
        return None

    def _new_id(self, prefix: str) -> str:
        self._next_id += 1
        return f"{prefix}-sim{self._next_id:012d}"

    @staticmethod
    def _usage(plan: List[Tuple[str, int, Sequence]], n: int) -> Dict[str, Any]:
        prompt = sum(pt for _, pt, _ in plan[::n])
        completion = sum(seq.generated for _, _, seq in plan)
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                "completion_tokens": completion, "prompt_tokens_details": None}

    def _completions(self, req: Request):
        try:
            body = self._json_body(req)
            prompt = body.get("prompt")
            texts: List[str]
            counts: List[int]
            if prompt == "" or (isinstance(prompt, list) and "" in prompt):
                raise ApiError("The prompt cannot be empty", param="prompt")
            if isinstance(prompt, str):
                texts = [prompt]
                counts = [answers.count_tokens(prompt)]
            elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                texts = prompt
                counts = [answers.count_tokens(p) for p in prompt]
            elif isinstance(prompt, list) and prompt and all(
                    isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                texts = [" ".join(map(str, prompt))]
                counts = [len(prompt)]
            elif isinstance(prompt, list) and prompt and all(
                    isinstance(p, list) and p and all(
                        isinstance(t, int) and not isinstance(t, bool) for t in p)
                    for p in prompt):
                texts = [" ".join(map(str, p)) for p in prompt]
                counts = [len(p) for p in prompt]
            else:
                raise ApiError("prompt must be a string, a non-empty list of strings, "
                               "or token ids", param="prompt")
            max_tokens = _int_field(body, "max_tokens", 16, 1)
            n = _int_field(body, "n", 1, 1, MAX_N)
            plan = self._plan(body, texts, counts, max_tokens, n)
        except ApiError as e:
            return self._bad(e)
        return self._finish_completions(plan, n)

    async def _finish_completions(self, plan, n: int) -> Response:
        err = await self._generate(plan)
        if err is not None:
            return err
        choices = [{"index": i, "text": shown, "logprobs": None,
                    "finish_reason": seq.finish_reason, "stop_reason": None,
                    "prompt_logprobs": None}
                   for i, (shown, _, seq) in enumerate(plan)]
        return json_response(200, {
            "id": self._new_id("cmpl"), "object": "text_completion",
            "created": int(time.time()), "model": self.model, "choices": choices,
            "usage": self._usage(plan, n)})

    def _chat_completions(self, req: Request):
        try:
            body = self._json_body(req)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError("messages must be a non-empty list", param="messages")
            norm = []
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise ApiError(f"messages[{i}] must be an object with a string 'role'",
                                   param="messages")
                norm.append({"role": m["role"], "content": _message_text(m.get("content"), i)})
            text, tokens = answers.chat_prompt(norm)
            max_tokens = _int_field(body, "max_completion_tokens", None, 1)
            if max_tokens is None:
                max_tokens = _int_field(body, "max_tokens", None, 1)
            n = _int_field(body, "n", 1, 1, MAX_N)
            plan = self._plan(body, [text], [tokens], max_tokens, n)
        except ApiError as e:
            return self._bad(e)
        return self._finish_chat(plan, n)

    async def _finish_chat(self, plan, n: int) -> Response:
        err = await self._generate(plan)
        if err is not None:
            return err
        choices = [{"index": i,
                    "message": {"role": "assistant", "content": shown,
                                "reasoning_content": None, "tool_calls": []},
                    "logprobs": None, "finish_reason": seq.finish_reason,
                    "stop_reason": None}
                   for i, (shown, _, seq) in enumerate(plan)]
        return json_response(200, {
            "id": self._new_id("chatcmpl"), "object": "chat.completion",
            "created": int(time.time()), "model": self.model, "choices": choices,
            "usage": self._usage(plan, n), "prompt_logprobs": None})

    # -- /tokenize ------------------------------------------------------------------

    def _tokenize(self, req: Request):
        """vLLM's /tokenize: {prompt | messages, add_special_tokens?,
        add_generation_prompt? (messages, default true), model?} ->
        {count, max_model_len, tokens}, counted with the same model that
        charges prompts in /v1/completions and /v1/chat/completions."""
        self.num_tokenize_requests += 1
        try:
            body = self._json_body(req)
            if "messages" in body:
                messages = body["messages"]
                if not isinstance(messages, list) or not messages:
                    raise ApiError("messages must be a non-empty list", param="messages")
                norm = []
                for i, m in enumerate(messages):
                    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                        raise ApiError(f"messages[{i}] must be an object with a string 'role'",
                                       param="messages")
                    norm.append({"role": m["role"],
                                 "content": _message_text(m.get("content"), i)})
                count = answers.chat_prompt(norm)[1]
                if "add_generation_prompt" in body and not _bool_field(
                        body, "add_generation_prompt"):
                    count -= answers.CHAT_REPLY_TOKENS
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise ApiError("prompt must be a string", param="prompt")
                count = answers.count_tokens(prompt) if prompt else 0
            _bool_field(body, "add_special_tokens")
        except ApiError as e:
            return self._bad(e)
        return self._finish_tokenize(count)

    async def _finish_tokenize(self, count: int) -> Response:
        self.tokenize_in_flight += 1
        self.tokenize_peak = max(self.tokenize_peak, self.tokenize_in_flight)
        try:
            if self.tokenize_delay_s > 0:
                await asyncio.sleep(self.tokenize_delay_s)
        finally:
            self.tokenize_in_flight -= 1
        # Token ids are made up (the simulator has no vocabulary); the count is real.
        return json_response(200, {"count": count, "max_model_len": self.max_model_len,
                                   "tokens": [100 + i % 30000 for i in range(count)],
                                   "token_strs": None})

    # -- other routes ---------------------------------------------------------------

    def _models(self, req: Request) -> Response:
        return json_response(200, {"object": "list", "data": [{
            "id": self.model, "object": "model", "created": self.created,
            "owned_by": "vllm", "root": self.model, "parent": None,
            "max_model_len": self.max_model_len, "permission": []}]})

    def _health(self, req: Request) -> Response:
        return Response(200, b"", "text/plain; charset=utf-8")

    def _version(self, req: Request) -> Response:
        return json_response(200, {"version": "batchgate-simserver"})

    def _metrics(self, req: Request) -> Response:
        return Response(200, self.metrics_text().encode("utf-8"),
                        "text/plain; version=0.0.4; charset=utf-8")

    def metrics_text(self) -> str:
        """Prometheus exposition with vLLM v1's names and labels."""
        e = self.engine
        labels = f'model_name="{self.model}",engine="0"'
        lines: List[str] = []

        def metric(name: str, kind: str, doc: str, value: float, extra: str = "") -> None:
            sample = name + "_total" if kind == "counter" else name
            lines.append(f"# HELP {sample} {doc}")
            lines.append(f"# TYPE {sample} {kind}")
            lines.append(f"{sample}{{{labels}{extra}}} {float(value)!r}")

        metric("vllm:num_requests_running", "gauge",
               "Number of requests in model execution batches.", len(e.running))
        metric("vllm:num_requests_waiting", "gauge",
               "Number of requests waiting to be processed.", len(e.waiting))
        metric("vllm:kv_cache_usage_perc", "gauge",
               "KV-cache usage. 1 means 100 percent usage.", e.kv_cache_usage)
        # Deprecated name of the same gauge, still read by older dashboards.
        metric("vllm:gpu_cache_usage_perc", "gauge",
               "GPU KV-cache usage. 1 means 100 percent usage.", e.kv_cache_usage)
        metric("vllm:num_preemptions", "counter",
               "Cumulative number of preemption from the engine.", e.num_preemptions)
        metric("vllm:prompt_tokens", "counter",
               "Number of prefill tokens processed.", e.prompt_tokens_total)
        metric("vllm:generation_tokens", "counter",
               "Number of generation tokens processed.", e.generation_tokens_total)
        lines.append("# HELP vllm:request_success_total Count of successfully processed requests.")
        lines.append("# TYPE vllm:request_success_total counter")
        for reason in ("stop", "length"):
            lines.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} '
                         f"{float(e.success_total[reason])!r}")
        lines.append("# HELP vllm:e2e_request_latency_seconds Histogram of e2e request "
                     "latency in seconds.")
        lines.append("# TYPE vllm:e2e_request_latency_seconds histogram")
        cumulative = 0
        for le, count in zip(E2E_BUCKETS + (None,), e.e2e_buckets):
            cumulative += count
            bound = "+Inf" if le is None else repr(float(le))
            lines.append(f'vllm:e2e_request_latency_seconds_bucket{{{labels},le="{bound}"}} '
                         f"{float(cumulative)!r}")
        lines.append(f"vllm:e2e_request_latency_seconds_count{{{labels}}} {float(cumulative)!r}")
        lines.append(f"vllm:e2e_request_latency_seconds_sum{{{labels}}} {float(e.e2e_sum)!r}")
        lines.append("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig")
        lines.append("# TYPE vllm:cache_config_info gauge")
        lines.append(f'vllm:cache_config_info{{block_size="{e.block_size}",engine="0",'
                     f'num_gpu_blocks="{e.num_blocks}"}} 1.0')
        # The simulator's own series (not in vLLM).
        metric("batchgate_sim:oom_errors", "counter",
               "Sequences failed with out-of-memory (naive mode).", e.num_oom_errors)
        metric("batchgate_sim:recomputed_tokens", "counter",
               "Tokens prefilled again after a preemption.", e.recomputed_tokens_total)
        metric("batchgate_sim:peak_kv_cache_usage_perc", "gauge",
               "Highest KV-cache usage since start or reset.", e.peak_kv_cache_usage)
        return "\n".join(lines) + "\n"

    def _timeline(self, req: Request) -> Response:
        since = -1.0
        for part in req.query.split("&"):
            key, _, value = part.partition("=")
            if key == "since":
                try:
                    since = float(value)
                except ValueError:
                    return self._bad(ApiError(f"since must be a number, got {value[:20]!r}",
                                              param="since"))
        return json_response(200, self.timeline(since))

    def _stats(self, req: Request) -> Response:
        return json_response(200, self.stats())

    def _reset(self, req: Request) -> Response:
        self.reset_stats()
        return json_response(200, {"reset": True})


class SimServerThread:
    """A SimServer on its own event loop in a background thread, for
    synchronous callers and tests::

        with SimServerThread(kv_cache_tokens=4096, max_model_len=2048) as srv:
            urlopen(srv.base_url + "/v1/models")
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> None:
        self.server = SimServer(**kwargs)
        self._host, self._port = host, port
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._stop_event: Optional[asyncio.Event] = None
        self._error: Optional[BaseException] = None

    def start(self) -> str:
        """Start serving; return the base URL (http://127.0.0.1:PORT)."""
        if self._thread is not None:
            raise RuntimeError("SimServerThread is already started")
        self._thread = threading.Thread(target=self._main, name="batchgate-simserver",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self.base_url

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop_event = asyncio.Event()
        try:
            await self.server.start(self._host, self._port)
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await self.server.stop()

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop_event is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop_event.set)
            except RuntimeError:  # loop already closed
                pass
        self._thread.join()
        self._thread = None

    def call(self, fn, *args: Any) -> Any:
        """Run fn(*args) on the server's loop and return its result (directly
        once the server is stopped, so its numbers stay readable)."""
        if self._thread is None or not self._thread.is_alive():
            return fn(*args)

        async def run() -> Any:
            return fn(*args)
        assert self._loop is not None  # set before the thread runs
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def timeline(self, since: float = -1.0) -> Dict[str, Any]:
        return self.call(self.server.timeline, since)

    def stats(self) -> Dict[str, Any]:
        return self.call(self.server.stats)

    def reset_stats(self) -> None:
        self.call(self.server.reset_stats)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def port(self) -> int:
        return self.server.port  # type: ignore[return-value]

    def __enter__(self) -> "SimServerThread":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

