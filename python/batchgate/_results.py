"""openai-shaped views of a batchgate.Result, built only when asked for.

The C Result keeps what every answer has (text, finish_reason, usage, model)
in a fixed 80-byte object; what only some answers carry (several choices,
tool calls, logprobs, the raw bytes) is kept beside it and turned into these
objects here, on first access. ``AttrDict`` answers both openai-python's
attribute style (``choice.message.tool_calls[0].function.arguments``) and
plain dict access (``choice["message"]``), so code written either way works.
"""
from __future__ import annotations

import json
from typing import Any, List, Optional


class AttrDict(dict):  # type: ignore[type-arg]
    """A dict whose keys are also attributes (missing key -> AttributeError)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def model_dump(self) -> dict:  # type: ignore[type-arg]
        """A plain-dict copy (the name openai-python's objects use)."""
        return json.loads(json.dumps(self))

    def __repr__(self) -> str:
        return f"AttrDict({dict.__repr__(self)})"


def _loads(s: Optional[str]) -> Any:
    return None if s is None else json.loads(s, object_hook=AttrDict)


def parse_raw(data: bytes) -> Any:
    """Result.raw: the answer's JSON as plain dicts and lists."""
    return json.loads(data)


def choices(result: Any) -> List[AttrDict]:
    out = []
    chat = result._chat
    for i, (text, finish_reason, tool_calls, logprobs) in enumerate(result._choice_data):
        c = AttrDict(index=i, finish_reason=finish_reason, logprobs=_loads(logprobs))
        if chat:
            calls = _loads(tool_calls)
            # openai-python gives content None for a pure tool call answer.
            c["message"] = AttrDict(role="assistant",
                                    content=None if calls and not text else text,
                                    tool_calls=calls)
        else:
            c["text"] = text
        out.append(c)
    return out


def tool_calls(result: Any) -> Optional[List[AttrDict]]:
    data = result._choice_data
    return _loads(data[0][2]) if data and result._chat else None


def log_retries(ok: bool, index: int, attempts: int, status: int, curl_code: int,
                waited: float) -> None:
    """Called at delivery for a request that was retried: the engine thread
    never takes the GIL, so it records the last reason and the total wait and
    the loop thread logs them here, once per request."""
    import logging
    log = logging.getLogger("batchgate")
    if not log.isEnabledFor(logging.INFO):
        return
    reason = f"HTTP {status}" if status else (f"curl error {curl_code}" if curl_code else "?")
    where = f"item {index}" if index >= 0 else "request"
    log.info("%s %s after %d attempts (%d retries, last because of %s; %.2f s of backoff)",
             where, "succeeded" if ok else "failed", attempts, attempts - 1, reason, waited)
