from typing import Any, Callable, List, Optional, Sequence, Tuple

libcurl_version: str

class BatchgateError(Exception): ...

def dynamic_batch_size(
    texts: Sequence[str], max_tokens: int, min_size: int, max_size: int, default_size: int
) -> int: ...
def estimate_tokens(text: str, method: str) -> int: ...
def estimate_many(texts: Sequence[str], method: str) -> List[int]: ...
def _token_features(text: str) -> Tuple[int, ...]: ...
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
) -> Tuple[List[List[str]], List[int], List[int], List[int], Optional[List[int]]]: ...
_estimator_weights: Tuple[int, ...]
