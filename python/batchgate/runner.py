"""Former home of ``batchgate run``; the code now lives in ``batchgate.run``.
Kept so existing imports (``from batchgate.runner import ...``) keep working."""
from .run import *  # noqa: F401,F403
from .run import __all__ as __all__  # noqa: F401
