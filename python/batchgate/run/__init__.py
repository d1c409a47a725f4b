"""The main job as a library and a command: sentiment counts per restaurant,
batch by batch, through a vLLM server.

- ``prompt``: the prompt and the answer check;
- ``batches``: token-budgeted batches, their keys and priority order;
- ``batchlog``: the durable per-batch log (resume);
- ``pipeline``: batches through ``Dispatcher`` streams, the retry policy;
- ``aggregate``: per-restaurant results in the original's shape;
- ``probe``: what the server says about itself;
- ``progress``: progress lines on stderr;
- ``analyze``: ``analyze_restaurants`` (the original's shapes) and ``LLMUtils``;
- ``command``: ``batchgate run``.
"""
from .aggregate import aggregate, percent
from .analyze import LLMUtils, analyze_groups, analyze_restaurants
from .batches import Batch, BatchPlan, build_batches, priority_order
from .batchlog import BatchLog
from .command import read_groups, run_command
from .pipeline import DispatchStats, dispatch_batches, make_dispatcher
from .probe import AUTO_TOKEN_CAP_FRACTION, ServerUnreachable, preflight, server_kv_tokens
from .progress import Progress
from .prompt import (ANSWER_MAX_TOKENS, SENTIMENT_PROMPT, AnswerError, load_template,
                     parse_answer, render_prompt, template_overhead)

__all__ = [
    "ANSWER_MAX_TOKENS", "AUTO_TOKEN_CAP_FRACTION", "AnswerError", "Batch", "BatchLog",
    "BatchPlan", "DispatchStats", "LLMUtils", "Progress", "SENTIMENT_PROMPT",
    "ServerUnreachable", "aggregate", "analyze_groups", "analyze_restaurants",
    "build_batches", "dispatch_batches", "load_template", "make_dispatcher", "parse_answer",
    "percent", "preflight", "priority_order", "read_groups", "render_prompt", "run_command",
    "server_kv_tokens", "template_overhead",
]
