#!/usr/bin/env bash
# The whole pipeline on a generated dataset: set up .venv, pretrain SynCo, linear probe and k-NN.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -d .venv ] || python3 -m venv .venv
    . .venv/bin/activate
fi
pip install -q -r requirements.txt
python demo.py "$@"
