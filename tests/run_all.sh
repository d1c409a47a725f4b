#!/usr/bin/env bash
# Every test tier that runs without a GPU or a real vLLM:
#  1. the pure-C core under AddressSanitizer+UBSan, ThreadSanitizer and valgrind,
#     and the estimator/planner and the JSON codec under libFuzzer for
#     BATCHGATE_FUZZ_SECONDS (20) each;
#  2. pytest against the installed batchgate on the default python3;
#  3. pytest again against the extension itself built with ASan+UBSan
#     (BATCHGATE_SANITIZE=address, libasan preloaded into python; leak
#     checking off: CPython's own allocations would drown it). BATCHGATE_ASAN=0
#     skips it;
#  4. pytest again on the other Pythons 3.10-3.13 that pyenv has, each in a
#     fresh venv (BATCHGATE_PYTHONS="3.12 3.13" picks them; "none" skips).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== C core: asan, tsan, valgrind, libFuzzer"
make -s -C tests/c all
make -s -C tests/c fuzz FUZZ_SECONDS=${BATCHGATE_FUZZ_SECONDS:-20}

echo "== pytest on $(python3 --version)"
# Run from tests/ so the installed package is tested, not the source tree.
(cd tests && python3 -m pytest -q -p no:cacheprovider .)

if [ "${BATCHGATE_ASAN:-1}" != 0 ]; then
    # libstdc++ too, or ASan cannot find the real __cxa_throw for C++
    # extensions loaded later (matplotlib in the demo test).
    preload="$(cc -print-file-name=libasan.so) $(cc -print-file-name=libstdc++.so)"
    venv=$(mktemp -d)/venv
    echo "== pytest on $(python3 --version), extension built with ASan+UBSan (venv $venv)"
    python3 -m venv "$venv"
    BATCHGATE_SANITIZE=address BATCHGATE_WERROR=1 "$venv/bin/python" -m pip install -q \
        --disable-pip-version-check ".[test]"
    # halt_on_error: any report fails the run (UBSan is built without recovery).
    (cd tests && LD_PRELOAD="$preload" \
        ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
        UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        "$venv/bin/python" -m pytest -q -p no:cacheprovider .)
    rm -rf "$(dirname "$venv")"
fi

default=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
wanted=${BATCHGATE_PYTHONS:-"3.10 3.11 3.12 3.13"}
[ "$wanted" = none ] && exit 0
for v in $wanted; do
    [ "$v" = "$default" ] && continue
    py=""
    # pyenv keeps each version under its root; its shims only run the active one.
    if command -v pyenv >/dev/null 2>&1; then
        py=$(ls -d "$(pyenv root)"/versions/"$v".*/bin/python"$v" 2>/dev/null | sort -V | tail -n 1 || true)
    fi
    [ -n "$py" ] || py=$(command -v "python$v" || true)
    if [ -z "$py" ] || ! "$py" -c 'import venv' 2>/dev/null; then
        echo "== python$v: not installed here, skipped"
        continue
    fi
    venv=$(mktemp -d)/venv
    echo "== pytest on $("$py" --version) (venv $venv)"
    "$py" -m venv "$venv"
    BATCHGATE_WERROR=1 "$venv/bin/python" -m pip install -q --disable-pip-version-check ".[test]"
    (cd tests && "$venv/bin/python" -m pytest -q -p no:cacheprovider .)
    rm -rf "$(dirname "$venv")"
done
