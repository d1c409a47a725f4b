"""batchgate: push large volumes of LLM work through a vLLM server, fast and
within a token budget. The core is the C extension ``batchgate._native``."""
from ._native import BatchgateError, BoundedSemaphore, Semaphore, libcurl_version
from .batchfile import BatchSummary, run_batch_file, run_batch_file_sync
from .config import Config
from .dispatcher import (
    ClosedError,
    Dispatcher,
    HTTPStatusError,
    MalformedResponseError,
    Result,
    TimeoutError,
    TransportError,
)
from .compat import (
    BatchFailed,
    BatchResults,
    generate_with_vllm,
    process_batches,
    vllm_generate,
)
from .run import LLMUtils, analyze_restaurants
from .sync import SyncDispatcher
from .sizing import (
    Plan,
    calculate_dynamic_batch_size,
    estimate_many,
    estimate_tokens,
    plan_batches,
)

__version__ = "0.1.0"

__all__ = [
    "BatchFailed",
    "BatchResults",
    "BatchSummary",
    "BatchgateError",
    "BoundedSemaphore",
    "ClosedError",
    "Config",
    "Dispatcher",
    "SyncDispatcher",
    "HTTPStatusError",
    "MalformedResponseError",
    "Result",
    "TimeoutError",
    "TransportError",
    "LLMUtils",
    "analyze_restaurants",
    "generate_with_vllm",
    "process_batches",
    "run_batch_file",
    "run_batch_file_sync",
    "vllm_generate",
    "Plan",
    "Semaphore",
    "calculate_dynamic_batch_size",
    "estimate_many",
    "estimate_tokens",
    "libcurl_version",
    "plan_batches",
]
