"""The whole job as one coroutine, in the original pipeline's data shapes:
restaurants in, per-restaurant sentiment counts out."""
from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..config import Config
from ..dispatcher import Dispatcher
from ..reviews import groups_from_restaurants
from .aggregate import aggregate
from .batches import BatchPlan, Groups, build_batches
from .batchlog import BatchLog
from .pipeline import DispatchStats, dispatch_batches, make_dispatcher
from .probe import AUTO_TOKEN_CAP_FRACTION, preflight, server_kv_tokens, ServerUnreachable
from .prompt import ANSWER_MAX_TOKENS, SENTIMENT_PROMPT, check_template

TokenCap = Union[int, str, None]


async def resolve_token_cap(base_url: str, api_key: Optional[str], cap: TokenCap,
                            timeout: float = 5.0) -> Tuple[Optional[int], Optional[int]]:
    """(cap, server KV tokens). "auto": 95 % of the server's KV cache from
    vLLM's /metrics, None when the server does not publish it."""
    if cap != "auto":
        return cap if cap else None, None  # type: ignore[return-value]
    kv = await asyncio.get_running_loop().run_in_executor(
        None, server_kv_tokens, base_url, api_key, timeout)
    return (int(kv * AUTO_TOKEN_CAP_FRACTION) if kv else None), kv


async def analyze_groups(groups: Groups, *, dispatcher: Dispatcher,
                         template: str = SENTIMENT_PROMPT,
                         max_tokens_per_batch: Optional[int] = None,
                         max_batch_size: Optional[int] = None,
                         max_retries: Optional[int] = None,
                         max_tokens: int = ANSWER_MAX_TOKENS, chat: bool = False,
                         extra_body: Optional[Dict[str, Any]] = None,
                         priority: Optional[bool] = None, log: Optional[BatchLog] = None,
                         plan: Optional[BatchPlan] = None, simulated: bool = False,
                         progress: Optional[Callable[[DispatchStats], None]] = None,
                         stop: Optional[asyncio.Event] = None
                         ) -> Tuple[List[Dict[str, Any]], DispatchStats, BatchPlan, BatchLog]:
    """Plan, send what the log does not have yet, aggregate. The engine
    behind both ``analyze_restaurants`` and ``batchgate run``."""
    if plan is None:
        plan = build_batches(groups, template, max_tokens_per_batch=max_tokens_per_batch,
                             max_batch_size=max_batch_size)
    log = log if log is not None else BatchLog(None, resume=False)
    todo = [b for b in plan.batches if not log.done(b.key)]
    retries = Config.MAX_RETRIES if max_retries is None else max_retries
    st = await dispatch_batches(dispatcher, todo, template, log=log, max_retries=retries,
                                max_tokens=max_tokens, params=extra_body, chat=chat,
                                progress=progress, stop=stop, priority=priority)
    return aggregate(groups, plan.batches, log, simulated=simulated), st, plan, log


async def analyze_restaurants(restaurants_data: Sequence[Dict[str, Any]], *,
                              dispatcher: Optional[Dispatcher] = None,
                              base_url: Optional[str] = None, api_key: Optional[str] = None,
                              model: Optional[str] = None, text_field: Optional[str] = None,
                              id_field: str = "restaurant_id",
                              prompt_template: Optional[str] = None,
                              max_tokens_per_batch: Optional[int] = None,
                              max_batch_size: Optional[int] = None,
                              max_concurrent: Optional[int] = None,
                              max_inflight_tokens: TokenCap = "auto",
                              max_retries: Optional[int] = None,
                              max_tokens: int = ANSWER_MAX_TOKENS, chat: bool = False,
                              extra_body: Optional[Dict[str, Any]] = None,
                              priority: Optional[bool] = None) -> List[Dict[str, Any]]:
    """Sentiment counts per restaurant, in the original pipeline's shapes.

    ``restaurants_data``: ``[{"restaurant_id": .., "reviews": [{"content": ..}, ..]}, ..]``
    (the text field is detected: content, text, review, ...; reviews may be
    plain strings). Returns one dict per restaurant, in input order:
    ``restaurant_id, positive_count, negative_count, total, positive_ratio,
    negative_ratio`` (int percent of total, None if nothing was scored), plus
    ``reviews, batches, failed_batches, unscored_reviews, complete``. A batch
    whose answer stays unusable after the retries is a failed batch, its
    reviews unscored: never counted as zero.

    Reviews are split with batchgate's token-budget planner
    (``max_tokens_per_batch``, default Config.VLLM_MAX_TOKENS_PER_BATCH), sent
    capped by ``max_concurrent`` (Config.VLLM_MAX_CONCURRENT_BATCHES) and by
    estimated tokens in flight (``max_inflight_tokens``: "auto" = 95 % of the
    server's KV cache when vLLM publishes it, a number, or None). Without a
    ``dispatcher`` one is made for ``base_url`` (else $VLLM_BASE_URL, else
    http://127.0.0.1:8000/v1) with ``model`` (else Config.LLM_MODEL, else the
    server's first model) and closed afterwards. ``priority`` defaults to
    Config.VLLM_USE_PRIORITY_QUEUE.
    """
    groups, _ = groups_from_restaurants(restaurants_data, text_field=text_field,
                                        id_field=id_field)
    template = check_template(prompt_template) if prompt_template else SENTIMENT_PROMPT
    own = dispatcher is None
    if own:
        base_url = base_url or os.getenv("VLLM_BASE_URL") or "http://127.0.0.1:8000/v1"
        api_key = api_key or os.getenv("VLLM_API_KEY") or None
        model = model or Config.LLM_MODEL
        loop = asyncio.get_running_loop()
        if model is None:
            try:
                model, _ = await loop.run_in_executor(None, preflight, base_url, api_key)
            except ServerUnreachable:
                model = None  # the requests will say what is wrong
        cap, _ = await resolve_token_cap(base_url, api_key, max_inflight_tokens)
        dispatcher = make_dispatcher(
            base_url, api_key=api_key, model=model,
            max_concurrent=max_concurrent or Config.VLLM_MAX_CONCURRENT_BATCHES,
            max_inflight_tokens=cap,
            max_retries=Config.MAX_RETRIES if max_retries is None else max_retries)
    assert dispatcher is not None
    try:
        results, _, _, _ = await analyze_groups(
            groups, dispatcher=dispatcher, template=template,
            max_tokens_per_batch=max_tokens_per_batch, max_batch_size=max_batch_size,
            max_retries=max_retries, max_tokens=max_tokens, chat=chat, extra_body=extra_body,
            priority=priority)
    finally:
        if own:
            await dispatcher.aclose()
    return results


class LLMUtils:
    """The original pipeline's entry points under their own names::

        results = await batchgate.LLMUtils.analyze_multiple_restaurants_vllm(restaurants)
        responses, metrics = await batchgate.LLMUtils._generate_with_vllm(prompts, 0.1, 100)

    Both work on the class and on an instance."""

    if TYPE_CHECKING:
        # What the aliases below are, spelled out: type checkers see a staticmethod
        # object's type where callers get its function, and stubtest checks these
        # signatures against the runtime ones (so they cannot drift).
        @staticmethod
        async def analyze_multiple_restaurants_vllm(
                restaurants_data: Sequence[Dict[str, Any]], *,
                dispatcher: Optional[Dispatcher] = None, base_url: Optional[str] = None,
                api_key: Optional[str] = None, model: Optional[str] = None,
                text_field: Optional[str] = None, id_field: str = "restaurant_id",
                prompt_template: Optional[str] = None,
                max_tokens_per_batch: Optional[int] = None,
                max_batch_size: Optional[int] = None, max_concurrent: Optional[int] = None,
                max_inflight_tokens: TokenCap = "auto", max_retries: Optional[int] = None,
                max_tokens: int = ANSWER_MAX_TOKENS, chat: bool = False,
                extra_body: Optional[Dict[str, Any]] = None,
                priority: Optional[bool] = None) -> List[Dict[str, Any]]: ...

        @staticmethod
        def calculate_dynamic_batch_size(reviews: Sequence[str],
                                         max_tokens_per_batch: Optional[int] = None) -> int: ...
    else:
        analyze_multiple_restaurants_vllm = staticmethod(analyze_restaurants)
        calculate_dynamic_batch_size = staticmethod(Config.calculate_dynamic_batch_size)

    @staticmethod
    async def _generate_with_vllm(prompts: Any, temperature: float = 0.1,
                                  max_tokens: int = 100, **kw: Any) -> Tuple[List[str], Dict[str, Any]]:
        from ..compat import generate_with_vllm
        return await generate_with_vllm(prompts, temperature, max_tokens, **kw)
