"""batchgate.SyncDispatcher: the Dispatcher for scripts and threads.

One private event loop runs on a daemon thread and owns an ordinary
Dispatcher; every blocking call hands its coroutine to that loop and waits.
The engine, caps and connections are shared by every thread using the
client, so one SyncDispatcher can serve a thread pool safely. Calls must not
be made from inside the client's own callbacks (progress hooks run on its
loop thread).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import (Any, Awaitable, Callable, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple, TypeVar)

from .dispatcher import Dispatcher, Prompt, Result

T = TypeVar("T")

__all__ = ["SyncDispatcher"]

_END = object()


class SyncDispatcher:
    """Blocking client with Dispatcher's constructor and operations.

    ``generate``/``chat`` return a Result, ``map``/``chat_map`` a list in
    input order, ``as_completed`` an iterator of ``(index, result)``. Use it
    as a context manager or call ``close()``.
    """

    _parent: "SyncDispatcher"  # set on with_options() views only

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._lock = threading.Lock()
        ready: "concurrent.futures.Future[Dispatcher]" = concurrent.futures.Future()

        def main() -> None:
            asyncio.set_event_loop(self._loop)

            async def make() -> Dispatcher:
                return Dispatcher(*args, **kwargs)
            try:
                ready.set_result(self._loop.run_until_complete(make()))
            except BaseException as e:  # constructor errors go to the caller
                ready.set_exception(e)
                return
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, name="batchgate-sync-loop", daemon=True)
        self._thread.start()
        try:
            self._d = ready.result()
        except BaseException:
            self._thread.join()
            self._loop.close()
            self._closed = True
            raise

    @classmethod
    def _view(cls, parent: "SyncDispatcher", d: Dispatcher) -> "SyncDispatcher":
        v = cls.__new__(cls)
        v._loop, v._thread, v._lock, v._closed = parent._loop, parent._thread, parent._lock, False
        v._d = d
        v._parent = parent
        return v

    def __repr__(self) -> str:
        return f"<batchgate.SyncDispatcher of {self._d!r}>"

    @property
    def dispatcher(self) -> Dispatcher:
        """The async Dispatcher underneath (lives on the client's loop thread)."""
        return self._d

    def __getattr__(self, name: str) -> Any:
        # base_url, model, semaphore, max_concurrent, ... as on Dispatcher.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.__dict__["_d"], name)

    # ---- plumbing -------------------------------------------------------
    def _run(self, coro: Awaitable[T]) -> T:
        try:
            self._check_open()
        except BaseException:
            close = getattr(coro, "close", None)
            if close:
                close()
            raise
        if threading.current_thread() is self._thread:
            raise RuntimeError("SyncDispatcher called from its own loop thread (e.g. from a "
                               "progress callback); use the async Dispatcher there")
        fut: "concurrent.futures.Future[T]" = asyncio.run_coroutine_threadsafe(
            coro, self._loop)  # type: ignore[arg-type]
        try:
            return fut.result()
        except BaseException:
            # Ctrl-C or the like in the caller: stop the work on the loop too.
            fut.cancel()
            raise

    # ---- operations -----------------------------------------------------
    def generate(self, prompt: Prompt, **params: Any) -> Result:
        return self._run(self._d.generate(prompt, **params))

    def chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> Result:
        return self._run(self._d.chat(messages, **params))

    def map(self, prompts: Iterable[Prompt], **params: Any) -> List[Any]:
        return self._run(self._d.map(prompts, **params))

    def chat_map(self, conversations: Iterable[Sequence[Mapping[str, Any]]],
                 **params: Any) -> List[Any]:
        return self._run(self._d.chat_map(conversations, **params))

    def count_tokens(self, texts: Iterable[str], *, add_special_tokens: bool = True
                     ) -> List[int]:
        """Dispatcher.count_tokens: the server's /tokenize counts, cached."""
        return self._run(self._d.count_tokens(texts, add_special_tokens=add_special_tokens))

    def token_counter(self, *, add_special_tokens: bool = True) -> Callable[[str], int]:
        """A ``counter(text) -> int`` for ``plan_batches(..., counter=...)``. It
        asks one text at a time (cached); for many texts
        ``counts=sd.count_tokens(texts)`` is far faster (concurrent)."""
        def counter(text: str) -> int:
            return self.count_tokens([text], add_special_tokens=add_special_tokens)[0]
        return counter

    def as_completed(self, prompts: Iterable[Prompt], **params: Any
                     ) -> Iterator[Tuple[int, Any]]:
        """Iterator of ``(index, result)`` as requests finish. The loop side
        runs ahead by at most about one window; breaking out cancels the rest."""
        window = params.get("window") or self._d.window
        self._check_open()
        q: "queue.Queue[Any]" = queue.Queue()
        state: dict = {"stop": False}  # type: ignore[type-arg]

        async def pump() -> None:
            credit = state["credit"] = asyncio.Semaphore(0)
            given = window
            try:
                async for pair in self._d.as_completed(prompts, **params):
                    q.put(pair)
                    given -= 1
                    while given <= 0 and not state["stop"]:
                        await credit.acquire()
                        given += 1
            except BaseException as e:
                q.put((_END, e))
                return
            q.put((_END, None))

        def give() -> None:
            state["credit"].release()

        task_fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                item = q.get()
                if item[0] is _END:
                    if item[1] is not None and not isinstance(item[1], asyncio.CancelledError):
                        raise item[1]
                    return
                self._loop.call_soon_threadsafe(give)
                yield item
        finally:
            state["stop"] = True
            task_fut.cancel()

    def _check_open(self) -> None:
        if self._closed or getattr(self, "_parent", self)._closed:
            from ._native import ClosedError
            raise ClosedError("the SyncDispatcher is closed")

    def with_options(self, **options: Any) -> "SyncDispatcher":
        """As Dispatcher.with_options: a view sharing this client's engine."""
        return SyncDispatcher._view(getattr(self, "_parent", self), self._d.with_options(**options))

    def stats(self) -> dict:  # type: ignore[type-arg]
        return self._d.stats()

    # ---- lifecycle ------------------------------------------------------
    def close(self, *, wait: bool = False) -> None:
        """Stop the engine (pending requests fail with ClosedError unless
        ``wait=True``) and the loop thread. Idempotent; a view closes its root."""
        root = getattr(self, "_parent", self)
        with root._lock:
            if root._closed:
                return
            root._closed = True
        if root._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(root._d.aclose(wait=wait), root._loop).result()
            finally:
                root._loop.call_soon_threadsafe(root._loop.stop)
                root._thread.join()
        if not root._loop.is_closed():
            root._loop.close()

    def __enter__(self) -> "SyncDispatcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not getattr(self, "_parent", None) and not self._closed:
                self.close()
        except Exception:
            pass
