#!/usr/bin/env bash
# The GPU check in one command (tests + timed runs, see benchmarks/gpu_check.py); PYTHON picks the interpreter.
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_check.py" "$@"
