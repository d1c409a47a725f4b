"""Dispatcher's bulk calls: ``map``, ``chat_map``, ``as_completed`` and the
exact token counts (``count_tokens``), each one native job that pulls its
input a window at a time, with their ordering, chunking and progress helpers.

``batchgate.Dispatcher`` inherits them from ``_BulkCalls``; the single calls,
the event-loop binding and the lifecycle stay in ``batchgate.dispatcher``.
"""
from __future__ import annotations

import asyncio
import json
from typing import (Any, AsyncIterator, Dict, Iterable, List, Literal,
                    Mapping, Optional, Sequence, Tuple, Union, overload)

from . import _native, _progress, _options, _tokens
from ._native import BatchgateError, Result
from .config import Config

Prompt = Union[str, Sequence[str]]


class _BulkCalls:
    """Mixed into Dispatcher: what its bulk calls use of it is declared here."""

    _core: Any
    _root: Any
    _defaults: Dict[str, Any]
    model: Optional[str]
    semaphore: Any
    window: int
    exact_prompt_tokens: bool
    base_url: str

    # Dispatcher's own (binding, model lookup, request templates).
    def _bind(self) -> asyncio.AbstractEventLoop:
        raise NotImplementedError

    async def _ensure_model(self, params: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _template(self, params: Dict[str, Any]) -> Any:
        raise NotImplementedError

    # ---- bulk -----------------------------------------------------------
    # Typed overloads: without return_exceptions every item is a Result.
    @overload
    async def map(self, prompts: Iterable[Prompt], *, return_exceptions: Literal[False] = ...,
                  window: Optional[int] = ..., priority: Optional[bool] = ...,
                  progress: Any = ..., **params: Any) -> List[Result]: ...
    @overload
    async def map(self, prompts: Iterable[Prompt], *, return_exceptions: bool,
                  window: Optional[int] = ..., priority: Optional[bool] = ...,
                  progress: Any = ..., **params: Any) -> List[Union[Result, BaseException]]: ...

    async def map(self, prompts: Iterable[Prompt], *, return_exceptions: bool = False,
                  window: Optional[int] = None, priority: Optional[bool] = None,
                  progress: Any = None,
                  **params: Any) -> List[Any]:
        """Results in input order. Prompts are pulled from the iterable a window
        at a time, so a huge (or lazy) input never lives in flight all at once.
        Without ``return_exceptions`` the first failure is raised and the rest
        is cancelled; with it, failures take their item's place in the list.
        ``priority`` (default Config.VLLM_USE_PRIORITY_QUEUE): send the
        shortest estimated prompts first (the input is read whole for that).
        ``progress``: see batchgate._progress (a callable(done, total), a bar, or True)."""
        if priority is None:
            priority = Config.VLLM_USE_PRIORITY_QUEUE
        order: Optional[List[int]] = None
        src: Iterable[Any] = prompts
        if priority:
            items = list(prompts)
            order = _shortest_first(items)
            src = [items[i] for i in order]
        if progress is not None and progress is not False:
            res = await self._map_progress(False, src, return_exceptions, window, params,
                                           progress)
        else:
            res = await self._map(False, src, return_exceptions, window, params)
        if order is None:
            return res
        out: List[Any] = [None] * len(order)
        for k, i in enumerate(order):
            out[i] = res[k]
        return out

    @overload
    async def chat_map(self, conversations: Iterable[Sequence[Mapping[str, Any]]], *,
                       return_exceptions: Literal[False] = ..., window: Optional[int] = ...,
                       progress: Any = ..., **params: Any) -> List[Result]: ...
    @overload
    async def chat_map(self, conversations: Iterable[Sequence[Mapping[str, Any]]], *,
                       return_exceptions: bool, window: Optional[int] = ...,
                       progress: Any = ..., **params: Any
                       ) -> List[Union[Result, BaseException]]: ...

    async def chat_map(self, conversations: Iterable[Sequence[Mapping[str, Any]]], *,
                       return_exceptions: bool = False, window: Optional[int] = None,
                       progress: Any = None, **params: Any) -> List[Any]:
        """``map`` for chat: one request per messages list."""
        src = (_messages_json(m, i) for i, m in enumerate(conversations))
        if progress is not None and progress is not False:
            return await self._map_progress(True, src, return_exceptions, window, params,
                                            progress, _progress.total_of(conversations))
        return await self._map(True, src, return_exceptions, window, params)

    async def _map_progress(self, chat: bool, src: Iterable[Any], return_exceptions: bool,
                            window: Optional[int], params: Dict[str, Any], progress: Any,
                            total: Optional[int] = None) -> List[Any]:
        # With a progress hook map runs on the stream job and orders results
        # here: the plain map's native path stays free of per-item callbacks.
        bar = _progress.Progress(progress, total if total is not None
                                 else _progress.total_of(src), "map")
        out: List[Any] = []
        try:
            async for chunk in self._chunks(chat, src, return_exceptions, window, params):
                for i, r in chunk:
                    if i >= len(out):
                        out.extend([None] * (i + 1 - len(out)))
                    out[i] = r
                bar.advance(len(chunk))
        finally:
            bar.close()
        return out

    async def _map(self, chat: bool, src: Iterable[Any], return_exceptions: bool,
                   window: Optional[int], params: Dict[str, Any]) -> List[Any]:
        loop = self._bind()
        await self._ensure_model(params)
        counts = None
        if self.exact_prompt_tokens:
            src = list(src)  # counted first, then sent
            counts = await _tokens.prompt_counts(self, src, chat)
        fut = loop.create_future()
        window, ride = self._ride_window(window or self.window)
        job = self._core.submit(_native.JOB_MAP, chat, src, self._template(params), fut,
                                window, bool(return_exceptions), ride is not None, counts)
        try:
            return await fut
        except BaseException:
            job.cancel()
            raise
        finally:
            _end_ride(ride, window)

    def _ride_window(self, window: int) -> Tuple[int, Optional[List[Any]]]:
        # map/as_completed from a task holding permits of our semaphore: the
        # job rides on the ones no request of that task is riding on yet.
        rec = self.semaphore._held()
        if rec is None or rec[0] - rec[1] < 1:
            return window, None
        window = min(window, rec[0] - rec[1])
        rec[1] += window
        return window, rec

    @overload
    def as_completed(self, prompts: Iterable[Prompt], *,
                     return_exceptions: Literal[False] = ..., window: Optional[int] = ...,
                     progress: Any = ..., **params: Any) -> AsyncIterator[Tuple[int, Result]]: ...
    @overload
    def as_completed(self, prompts: Iterable[Prompt], *, return_exceptions: bool,
                     window: Optional[int] = ..., progress: Any = ..., **params: Any
                     ) -> AsyncIterator[Tuple[int, Union[Result, BaseException]]]: ...

    async def as_completed(self, prompts: Iterable[Prompt], *, return_exceptions: bool = False,
                           window: Optional[int] = None, progress: Any = None,
                           **params: Any) -> AsyncIterator[Tuple[int, Any]]:
        """Yield ``(index, result)`` as requests finish (any order). Without
        ``return_exceptions`` a failure is raised from the iteration."""
        bar = _progress.make(progress, prompts, "as_completed")
        try:
            async for chunk in self._chunks(False, prompts, return_exceptions, window, params):
                for pair in chunk:
                    yield pair
                if bar is not None:
                    bar.advance(len(chunk))
        finally:
            if bar is not None:
                bar.close()

    async def _chunks(self, chat: bool, src: Iterable[Any], return_exceptions: bool,
                      window: Optional[int], params: Dict[str, Any]
                      ) -> AsyncIterator[List[Tuple[int, Any]]]:
        """Lists of (index, result) as the engine delivers them."""
        loop = self._bind()
        await self._ensure_model(params)
        window, ride = self._ride_window(window or self.window)
        try:
            job = self._core.submit(_native.JOB_STREAM, chat, src, self._template(params),
                                    None, window, True, ride is not None)
        except BaseException:
            _end_ride(ride, window)
            raise
        try:
            while True:
                chunk = job.take()
                if chunk is None:
                    return
                if not chunk:
                    fut = loop.create_future()
                    job.arm(fut)
                    await fut
                    continue
                for k, (i, r) in enumerate(chunk):
                    # i < 0: the job itself failed (bad input, closed).
                    if i < 0 or (not return_exceptions and isinstance(r, BaseException)):
                        if k:
                            yield chunk[:k]
                        raise r
                yield chunk
        finally:
            job.cancel()
            _end_ride(ride, window)

    # ---- exact prompt token counts (vLLM's /tokenize, see _tokens) -------
    async def count_tokens(self, texts: Iterable[str], *,
                           add_special_tokens: bool = True) -> List[int]:
        """Each text's prompt tokens as the server's tokenizer counts them.

        One POST ``/tokenize`` per distinct text not counted before, sent by
        the native engine concurrently under the count cap (never charged
        to ``max_inflight_tokens`` or the KV admission), at the server root
        (``http://host:port/tokenize``). Counts are cached on the
        Dispatcher (bounded LRU, ``token_cache_size``), so repeating texts
        costs no request. Feed them to the planner with
        ``plan_batches(texts, budget, counts=await d.count_tokens(texts))``.
        A failure raises the engine's error re-said for the caller's index
        (``texts[i]: ...``); a server without /tokenize (404) says so."""
        if not isinstance(add_special_tokens, bool):
            raise TypeError(f"add_special_tokens must be a bool, not "
                            f"{type(add_special_tokens).__name__}")
        return await self._count_exact(
            _tokens.check_texts(texts), _native.KIND_TOKENIZE,
            {"add_special_tokens": add_special_tokens}, "texts")

    async def count_chat_tokens(self, conversations: Iterable[Sequence[Mapping[str, Any]]],
                                *, add_generation_prompt: bool = True) -> List[int]:
        """``count_tokens`` for chat: each messages list's prompt tokens with
        the server's chat template (vLLM's /tokenize with ``messages``; with
        ``add_generation_prompt`` as /v1/chat/completions counts them)."""
        if not isinstance(add_generation_prompt, bool):
            raise TypeError(f"add_generation_prompt must be a bool, not "
                            f"{type(add_generation_prompt).__name__}")
        if isinstance(conversations, (str, bytes)) or not hasattr(conversations, "__iter__"):
            raise TypeError(f"conversations must be an iterable of message lists, not "
                            f"{type(conversations).__name__}")
        items = [_messages_json(m, i) for i, m in enumerate(conversations)]
        return await self._count_exact(items, _native.KIND_TOKENIZE_CHAT,
                                       {"add_generation_prompt": add_generation_prompt},
                                       "conversations")

    async def _count_exact(self, items: List[str], kind: int, fields: Dict[str, Any],
                           what: str) -> List[int]:
        root = self._root
        cache = root._token_cache
        if cache is None:
            cache = root._token_cache = _tokens.TokenCountCache(root.token_cache_size)
        # The model generation will name (GET /v1/models once, like generate),
        # so counts made before the first generation are reused by it.
        await self._ensure_model({})
        model = self.model if self.model is not None else root._resolved_model
        params = json.dumps(fields, sort_keys=True)
        key0 = (model, kind, params)
        out, missing = _tokens.plan_missing(cache, key0, items)
        if not missing:
            return out  # type: ignore[return-value]
        loop = self._bind()
        uniq = list(missing)
        opts = _options.call_options(self._defaults, {})
        tkey = ("/tokenize", params, model, opts.native)
        tmpl = root._templates.get(tkey)
        if tmpl is None:
            tmpl = root._templates[tkey] = root._core.template(model, params, opts.native)
        fut = loop.create_future()
        window, ride = self._ride_window(self.window)
        job = self._core.submit(_native.JOB_MAP, kind, uniq, tmpl, fut, window, False,
                                ride is not None)
        try:
            counts = await fut
        except BatchgateError as e:
            k = getattr(e, "index", None)
            if not isinstance(k, int) or not 0 <= k < len(uniq):
                raise  # not about one text (the Dispatcher was closed, ...)
            raise _tokens.renamed_error(e, f"{what}[{missing[uniq[k]][0]}]",
                                        self.tokenize_url) from None
        except BaseException:
            job.cancel()
            raise
        finally:
            _end_ride(ride, window)
        for t, c in zip(uniq, counts):
            cache.put(key0 + (t,), c)
            for i in missing[t]:
                out[i] = c
        return out  # type: ignore[return-value]

    @property
    def tokenize_url(self) -> str:
        """Where count_tokens() asks (credentials redacted)."""
        return _tokens.tokenize_url(self.base_url)


def _shortest_first(items: List[Any]) -> List[int]:
    from .sizing import estimate_many
    flat = [p if isinstance(p, str) else "".join(p) if isinstance(p, (list, tuple)) and
            all(isinstance(x, str) for x in p) else "" for p in items]
    cost = estimate_many(flat)
    return sorted(range(len(items)), key=cost.__getitem__)  # stable: ties keep input order


def _wake_rider(rec: List[Any]) -> None:
    q = rec[2]
    while q:
        w = q.popleft()
        if not w.done():
            w.set_result(None)
            return


def _end_ride(rec: Optional[List[Any]], window: int) -> None:
    if rec is not None:
        rec[1] -= window
        for _ in range(window):
            _wake_rider(rec)


def _messages_json(messages: Any, index: Optional[int]) -> str:
    where = "messages" if index is None else f"conversations[{index}]"
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"{where} must be a non-empty list of message dicts, "
                        f"not {type(messages).__name__}")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise TypeError(f"{where}[{k}] must be a dict with a str 'role'")
    return json.dumps(list(messages), separators=(",", ":"), ensure_ascii=False)
