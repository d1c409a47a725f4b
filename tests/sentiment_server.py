"""FakeVLLM (its fault directives, stats, echo answers) answering sentiment
prompts the way the simulated server does (batchgate.simserver.answers), and recording every
request body in arrival order (``bodies``). ``[[answer=garbage]]`` in a
prompt (``[[answer=garbage,times=K]]``: the first K attempts) makes the answer
a valid completion whose text is not a count."""
from __future__ import annotations

import threading
from typing import Any, Dict, List

from batchgate.simserver.answers import answer_for, is_sentiment_prompt
from fake_vllm import FakeVLLM


class SentimentServer(FakeVLLM):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.bodies: List[Dict[str, Any]] = []
        self._blk = threading.Lock()
        self._garbage = False

    async def _answer(self, writer, reader, chat, req, prompts, n, d, attempt):  # type: ignore[override]
        with self._blk:
            self.bodies.append(req)
        # For _ok_body, which the parent calls before its first await.
        times = int(d["times"]) if "times" in d else None
        self._garbage = d.get("answer") == "garbage" and (times is None or attempt <= times)
        return await super()._answer(writer, reader, chat, req, prompts, n, d, attempt)

    def _ok_body(self, chat, req, prompts, n):  # type: ignore[override]
        body = super()._ok_body(chat, req, prompts, n)
        for c in body["choices"]:
            prompt = prompts[c["index"] // max(1, n)]
            if not is_sentiment_prompt(prompt):
                continue  # FakeVLLM's echo
            text = "I could not count them." if self._garbage else answer_for(prompt)
            if chat:
                c["message"]["content"] = text
            else:
                c["text"] = text
        return body
