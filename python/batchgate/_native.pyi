from types import TracebackType
from builtins import TimeoutError as builtins_TimeoutError
from typing import (Any, Callable, Coroutine, Dict, List, Literal, Optional, Sequence, Tuple,
                    Type, Union, final)

from typing_extensions import disjoint_base


libcurl_version: str

class BatchgateError(Exception): ...

def dynamic_batch_size(
    texts: Sequence[str], max_tokens: int, min_size: int, max_size: int, default_size: int, /
) -> int: ...
def estimate_tokens(text: str, method: str, /) -> int: ...
def estimate_many(texts: Sequence[str], method: str, /) -> List[int]: ...
def _token_features(text: str, /) -> Tuple[int, ...]: ...
def plan(
    texts: Sequence[str],
    budget: int,
    counts: Optional[Sequence[int]],
    counter: Optional[Callable[[str], int]],
    max_batch_size: int,
    overhead: int,
    alone: bool,
    method: str,
    pack: bool,
    /,
) -> Tuple[List[List[str]], List[int], List[int], List[int], Optional[List[int]]]: ...
_estimator_weights: Tuple[int, ...]

@disjoint_base
class Semaphore:
    """asyncio.Semaphore drop-in on a native, thread-safe, weighted FIFO counter."""
    def __init__(self, value: int = 1) -> None: ...
    def acquire(self, /, n: int = 1) -> Coroutine[Any, Any, Literal[True]]: ...
    def release(self, /, n: int = 1) -> None: ...
    def locked(self, /) -> bool: ...
    def _track_holders(self, /) -> None: ...
    def _held(self, /) -> Optional[List[Any]]: ...
    def acquire_blocking(self, /, n: int = 1, timeout: Optional[float] = None) -> bool: ...
    @property
    def value(self) -> int: ...
    @property
    def _value(self) -> int: ...
    @property
    def bound(self) -> Optional[int]: ...
    def __aenter__(self) -> Coroutine[Any, Any, None]: ...
    def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> Coroutine[Any, Any, None]: ...

class BoundedSemaphore(Semaphore):
    """Semaphore whose release() past the initial value raises ValueError."""

# Test hooks: act on a Semaphore's native counter as the dispatcher thread does.
def _sem_native_release_later(sem: Semaphore, n: int, delay_ms: int, /) -> None: ...
def _sem_native_try_acquire(sem: Semaphore, n: int, /) -> bool: ...

# ---- dispatcher (bg_dispatcher.c) ----

class HTTPStatusError(BatchgateError):
    status: int
    message: str
    attempts: int
    curl_code: Optional[int]
    index: Optional[int]

class TransportError(BatchgateError):
    curl_code: int
    message: str
    attempts: int
    status: Optional[int]
    index: Optional[int]

class TimeoutError(BatchgateError, builtins_TimeoutError):
    curl_code: int
    message: str
    attempts: int
    status: Optional[int]
    index: Optional[int]

class MalformedResponseError(BatchgateError):
    message: str
    attempts: int
    status: Optional[int]
    curl_code: Optional[int]
    index: Optional[int]

class ClosedError(BatchgateError): ...

JOB_ONE: int
JOB_MAP: int
JOB_STREAM: int
KIND_TOKENIZE: int
KIND_TOKENIZE_CHAT: int

@final
class Result:
    """One completion: text of the first choice, all choices' texts, usage."""
    @property
    def text(self) -> str: ...
    @property
    def finish_reason(self) -> Optional[str]: ...
    @property
    def texts(self) -> Tuple[str, ...]: ...
    @property
    def usage(self) -> Optional[Dict[str, Optional[int]]]: ...
    @property
    def latency(self) -> float: ...
    @property
    def attempts(self) -> int: ...
    # openai-shaped fields (issue 14): choices/tool_calls/usage are AttrDicts
    # (dicts that also answer attribute access, as openai-python's objects do).
    @property
    def model(self) -> Optional[str]: ...
    @property
    def id(self) -> Optional[str]: ...
    @property
    def raw(self) -> Optional[Dict[str, Any]]: ...
    @property
    def choices(self) -> List[Any]: ...
    @property
    def tool_calls(self) -> Optional[List[Any]]: ...
    @property
    def _choice_data(self) -> Tuple[Tuple[str, Optional[str], Optional[str], Optional[str]], ...]: ...
    @property
    def _chat(self) -> bool: ...

@final
class _Template:
    @property
    def max_tokens(self) -> Optional[int]: ...
    @property
    def n(self) -> int: ...

@final
class _Job:
    @property
    def live(self) -> int: ...
    @property
    def pulled(self) -> int: ...
    @property
    def finished(self) -> bool: ...
    def cancel(self, /) -> None: ...
    def take(self, /) -> Optional[List[Tuple[int, Any]]]: ...
    def arm(self, future: Any, /) -> None: ...

@final
class _Dispatcher:
    def __init__(
        self,
        *,
        base_url: str,
        api_key: Optional[str] = None,
        max_concurrent: int = 20,
        semaphore: Optional[Semaphore] = None,
        max_inflight_tokens: int = 0,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        max_retries: int = 3,
        headers: Optional[Sequence[str]] = None,
        verify: bool = True,
        max_response_bytes: int = ...,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 60.0,
        retry_timeouts: bool = False,
        max_connections: int = 0,
        default_max_tokens: int = 16,
        admission: Optional[Dict[str, Any]] = None,
    ) -> None: ...
    @classmethod
    def probe(cls, metrics_url: str, models_url: Optional[str], api_key: Optional[str],
              headers: Sequence[str], verify: bool, timeout: float,
              model: Optional[str], /) -> Dict[str, Any]: ...
    def admission_events(self, /) -> List[Tuple[float, int, int, str]]: ...
    @property
    def live(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def forked(self) -> bool: ...
    def _on_readable(self, /) -> None: ...
    def bind(self, loop: Any, /) -> None: ...
    def template(
        self, model: Optional[str], params_json: Optional[str],
        options: Optional[Tuple[int, int, Tuple[str, ...], Optional[str], bool]] = None, /,
    ) -> _Template: ...
    def submit(
        self, mode: int, chat: Union[bool, int], source: Any, template: _Template, future: Any,
        window: int, return_exceptions: bool, count_preheld: bool = False,
        prompt_counts: Optional[List[int]] = None, /,
    ) -> _Job: ...
    def close(self, drop: bool = False, /) -> None: ...
    def stats(self, /) -> Dict[str, int]: ...
