"""Dagster's PostgreSQL storage with pool slots claimed one process at a time.

dagster-postgres runs every statement in autocommit, so its pool bookkeeping (count the free
slots, mark a pending step assigned, take the slot row `FOR UPDATE`) holds no lock between
statements: two run workers claiming the `train` pool in the same instant can both take its one
slot, and two training steps then share a GPU. Here each claim and each release runs under one
PostgreSQL advisory lock, so the limit holds across processes and hosts. The lock lives in the
claiming connection's session: a process that dies mid-claim releases it with its connection.

deploy/dagster.yaml names this class as the instance's storage (`storage: custom:`); its config
is dagster-postgres's own (`postgres_db:` or `postgres_url:`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as db
from dagster._core.storage.base_storage import DagsterStorage
from dagster._serdes import ConfigurableClassData
from dagster_postgres import (
    DagsterPostgresStorage,
    PostgresEventLogStorage,
    PostgresRunStorage,
    PostgresScheduleStorage,
)
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

# One lock for all pools: claims are short and infrequent (a step's claim is retried every few
# seconds at most), so serialising them across pools costs nothing measurable.
POOL_LOCK = 0x6C69_6665  # "life"


class SerialClaimEventLogStorage(PostgresEventLogStorage):
    """PostgresEventLogStorage whose pool claims and releases never interleave."""

    @contextmanager
    def _pool_lock(self) -> Iterator[None]:
        with self.index_connection() as conn:
            conn.execute(db.text("SELECT pg_advisory_lock(:key)"), {"key": POOL_LOCK})
            try:
                yield
            finally:
                conn.execute(db.text("SELECT pg_advisory_unlock(:key)"), {"key": POOL_LOCK})

    # Only the entry points take the lock; each calls the others' helpers, never another entry
    # point (an advisory lock is re-entrant within one session only, and these use several).
    def claim_concurrency_slot(self, concurrency_key, run_id, step_key, priority=None):
        with self._pool_lock():
            return super().claim_concurrency_slot(concurrency_key, run_id, step_key, priority)

    def free_concurrency_slot_for_step(self, run_id, step_key):
        with self._pool_lock():
            return super().free_concurrency_slot_for_step(run_id, step_key)

    def free_concurrency_slots_for_run(self, run_id):
        with self._pool_lock():
            return super().free_concurrency_slots_for_run(run_id)

    def set_concurrency_slots(self, concurrency_key, num):
        with self._pool_lock():
            return super().set_concurrency_slots(concurrency_key, num)

    def initialize_concurrency_limit_to_default(self, concurrency_key):
        with self._pool_lock():
            return super().initialize_concurrency_limit_to_default(concurrency_key)

    def delete_concurrency_limit(self, concurrency_key):
        with self._pool_lock():
            return super().delete_concurrency_limit(concurrency_key)

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **_settings(config_value))


class SerialClaimPostgresStorage(DagsterPostgresStorage):
    """DagsterPostgresStorage with SerialClaimEventLogStorage for its events and pools."""

    def __init__(
        self, postgres_url, should_autocreate_tables=True, inst_data=None, token_provider=None
    ):
        # DagsterPostgresStorage.__init__ with the one storage swapped (calling it would connect
        # a stock event log storage first, on every process that loads the instance).
        self.postgres_url = postgres_url
        self.should_autocreate_tables = should_autocreate_tables
        self._inst_data = inst_data
        self._run_storage = PostgresRunStorage(
            postgres_url, should_autocreate_tables, token_provider=token_provider
        )
        self._event_log_storage = SerialClaimEventLogStorage(
            postgres_url, should_autocreate_tables, token_provider=token_provider
        )
        self._schedule_storage = PostgresScheduleStorage(
            postgres_url, should_autocreate_tables, token_provider=token_provider
        )
        DagsterStorage.__init__(self)

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **_settings(config_value))

    @property
    def event_storage_data(self) -> ConfigurableClassData | None:
        if not self.inst_data:
            return None
        return ConfigurableClassData(
            __name__, "SerialClaimEventLogStorage", self.inst_data.config_yaml
        )


def _settings(config_value) -> dict:
    return {
        "postgres_url": pg_url_from_config(config_value),
        "should_autocreate_tables": config_value.get("should_autocreate_tables", True),
        "token_provider": get_token_provider_from_config(config_value),
    }
