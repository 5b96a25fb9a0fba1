"""Where lifecycle_dagster keeps its state: one directory, ``./.lifecycle`` or ``$LIFECYCLE_HOME``.

Dagster's home, the MLflow store, the artifact store and every library cache live below it; nothing is
written elsewhere. Importing this module points the Hugging Face and matplotlib caches there too.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_home() -> Path:
    return Path(os.environ.get("LIFECYCLE_HOME") or ".lifecycle").resolve()


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or state_home() / "dagster").resolve()


def artifacts_root() -> Path:
    return state_home() / "artifacts"


def object_cache() -> Path:
    """Local copies of artifacts kept on object storage."""
    return state_home() / "cache" / "objects"


def checkpoints_root() -> Path:
    """Trainer checkpoints of unfinished training steps (``$LIFECYCLE_CHECKPOINTS``: on a cluster,
    a volume that outlives the pod)."""
    return Path(os.environ.get("LIFECYCLE_CHECKPOINTS") or state_home() / "checkpoints").resolve()


def mlflow_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_home() / 'mlflow.db'}"


def feedback_url() -> str:
    """Where served responses and their feedback are kept (SQLAlchemy URL; PostgreSQL in a
    deployment, where the model server and Dagster are different machines)."""
    return os.environ.get("LIFECYCLE_FEEDBACK_URL") or f"sqlite:///{state_home() / 'feedback.db'}"


def mlflow_artifacts() -> Path:
    return state_home() / "mlflow-artifacts"


def configure_caches() -> None:
    cache = state_home() / "cache"
    for var, sub in (
        ("HF_HOME", "huggingface"),
        ("MPLCONFIGDIR", "matplotlib"),
        ("TRITON_CACHE_DIR", "triton"),
        ("XDG_CACHE_HOME", "xdg"),
    ):
        os.environ.setdefault(var, str(cache / sub))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Progress is reported per stage by the pipeline itself; library bars only clutter run logs.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")


configure_caches()
