#!/usr/bin/env bash
# Installs the peer tools that bench/peers.py compares TorchHook with.
#   - tensorboard and wandb into the active (project) environment, refusing if that would
#     replace its torch;
#   - smdebug 1.0.34 into bench/.venv-smdebug/, because it needs protobuf<=3.20.3 and numpy<2
#     (it calls ndarray.tostring), which the project environment cannot have.
# A peer that fails to install is reported here and later by peers.py as "not installed".
# Env: PYTHON (interpreter for the smdebug venv, default python3), SKIP_SMDEBUG=1, SKIP_MAIN=1.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3}"
status=0

if [ "${SKIP_MAIN:-0}" != 1 ]; then
    torch_before="$(python -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)"
    if python -m pip install --dry-run -r "$here/requirements-peers.txt" 2>/dev/null \
        | grep -E '^Would install' | tr ' ' '\n' | grep -qiE '^torch-'; then
        echo "setup_peers: installing tensorboard/wandb would replace torch $torch_before; skipped" >&2
        status=1
    elif ! python -m pip install -q -r "$here/requirements-peers.txt"; then
        echo "setup_peers: tensorboard/wandb failed to install into $(command -v python)" >&2
        status=1
    fi
fi

if [ "${SKIP_SMDEBUG:-0}" != 1 ]; then
    venv="$here/.venv-smdebug"
    if [ ! -x "$venv/bin/python" ]; then
        "$py" -m venv "$venv" || { echo "setup_peers: could not create $venv" >&2; exit 1; }
    fi
    # torch 2.13.0 resolves to the CPU wheel on disk (pip's find-links); the rest from the index.
    # smdebug.pytorch imports requests, pandas and psutil without declaring them.
    if ! "$venv/bin/python" -m pip install -q torch==2.13.0 'protobuf<=3.20.3' 'numpy<2' smdebug==1.0.34 \
        requests pandas psutil; then
        echo "setup_peers: smdebug failed to install into $venv" >&2
        status=1
    fi
    "$venv/bin/python" -c 'import smdebug, smdebug.pytorch, torch; print("smdebug", smdebug.__version__, "torch", torch.__version__)' \
        2>/dev/null || { echo "setup_peers: smdebug.pytorch does not import in $venv" >&2; status=1; }
fi
exit $status
