"""Input checks shared by the public entry points: errors name the argument
and the index of the bad item, so a user can find it in their data."""
from typing import Any, List


def str_list(values: Any, name: str, expected: str) -> List[str]:
    """``values`` as a list, every item checked to be a str.

    ``expected`` completes "NAME must be ..." when ``values`` is not iterable
    (e.g. "a str or a list of str"); callers decide beforehand what a single
    str means for them."""
    try:
        out = list(values)
    except TypeError:
        raise TypeError(f"{name} must be {expected}, not {type(values).__name__}") from None
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be str, not {type(v).__name__}")
    return out
