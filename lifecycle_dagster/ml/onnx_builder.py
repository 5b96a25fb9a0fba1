"""onnxruntime-genai's model builder for several exports in one process, so that its imports (torch,
transformers, onnx: seconds, longer than building a small model) are paid once per export, not
once per variant. ``ml.export`` runs it in a child process, which gives the memory of every model
it held back when it ends:

    python -m lifecycle_dagster.ml.onnx_builder BUILDS.json

BUILDS.json is a list of the builder's command lines (argument lists, as `python -m
onnxruntime_genai.models.builder` takes them). It prints ``<MARK> imported <seconds>`` after the
builder's imports and ``<MARK> built <index> <seconds>`` after each build; the first build that
fails ends the process with status 1 after its traceback and ``<MARK> failed <index>``."""

from __future__ import annotations

import importlib
import json
import runpy
import sys
import time
import traceback
from pathlib import Path

BUILDER = "onnxruntime_genai.models.builder"
MARK = "lifecycle-onnx-builder:"


def main(argv: list[str]) -> int:
    builds = json.loads(Path(argv[0]).read_text())
    start = time.monotonic()
    importlib.import_module(BUILDER)  # its imports once, before any build is timed
    print(f"{MARK} imported {time.monotonic() - start:.2f}", flush=True)
    for index, args in enumerate(builds):
        start = time.monotonic()
        sys.argv = [BUILDER, *args]
        try:
            runpy.run_module(BUILDER, run_name="__main__", alter_sys=True)
        except SystemExit as e:  # argparse, or the builder giving up
            if e.code not in (0, None):
                print(f"{MARK} failed {index} (exit status {e.code})", flush=True)
                return 1
        except Exception:
            traceback.print_exc()
            print(f"{MARK} failed {index}", flush=True)
            return 1
        print(f"{MARK} built {index} {time.monotonic() - start:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
