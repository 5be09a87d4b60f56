#!/usr/bin/env bash
# Create .venv and install retarget with its test tools, on a CPU machine or a CUDA one.
#   bash install.sh            # CPU wheels of torch (this project's CI machine)
#   TORCH_SPEC="torch torchvision" bash install.sh   # let pip pick your platform's torch build
# torch goes in first and pinned: a bare `torch` requirement pulls a multi-GB default build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $TORCH_SPEC
# shellcheck disable=SC2086
# The tested versions: pyproject's floors of diffusers, transformers and peft, exactly (.ci/floor-versions.txt).
"$VENV/bin/python" -m pip install -q -e ".[test]" -c .ci/floor-versions.txt ${PIP_EXTRA:-}
"$VENV/bin/python" -c "import retarget, torch; print('retarget', retarget.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
