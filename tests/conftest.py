import os
import sys

# Tests run against the installed package; fall back to an in-place build.
try:
    import batchgate  # noqa: F401
except ImportError:  # pragma: no cover - only for `setup.py build_ext --inplace`
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

sys.path.insert(0, os.path.dirname(__file__))
