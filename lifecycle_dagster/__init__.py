"""lifecycle_dagster: the generative-AI project lifecycle as one Dagster asset graph."""

from lifecycle_dagster import settings as _settings  # noqa: F401  (points caches at the state dir)
