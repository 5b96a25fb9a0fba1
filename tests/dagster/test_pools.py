"""The `train` pool's limit holds when run workers claim it in the same instant (real PostgreSQL).

dagster-postgres claims a pool slot in several autocommitted statements, so two workers that
start together can both take a one-slot pool: with its own storage in place of
deploy/dagster.yaml's, the race below gave two claims within 6 rounds, three times out of three.
deploy/dagster.yaml's storage claims under a PostgreSQL lock."""

from __future__ import annotations

import threading
import uuid

import dagster as dg
import pytest
from servers import ROOT, Postgres

from lifecycle_dagster.lib.pg_storage import SerialClaimEventLogStorage, SerialClaimPostgresStorage

WORKERS, ROUNDS = 8, 10


@pytest.fixture(scope="module")
def pg():
    server = Postgres().start(databases=("dagster",))
    try:
        yield server
    finally:
        server.stop()


def claim_together(storages: list) -> tuple[list[str], list[str]]:
    """Workers, each with its own storage (connections), claim `train` at one barrier."""
    n = len(storages)
    barrier, claimed, errors = threading.Barrier(n), [], []
    run_ids = [uuid.uuid4().hex for _ in range(n)]

    def claim(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            if storages[i].claim_concurrency_slot("train", run_ids[i], "sft_adapter").is_claimed:
                claimed.append(run_ids[i])
        except Exception as e:  # surfaced below, not lost in a thread
            errors.append(e)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return claimed, run_ids


def test_simultaneous_claims_never_take_more_slots_than_the_pool_has(pg):
    url = pg.url("dagster")
    storage = SerialClaimEventLogStorage(url)
    storage.set_concurrency_slots("train", 1)
    workers = [
        SerialClaimEventLogStorage(url, should_autocreate_tables=False) for _ in range(WORKERS)
    ]
    for round_ in range(ROUNDS):
        claimed, run_ids = claim_together(workers)
        assert len(claimed) == 1, (
            f"round {round_}: {len(claimed)} of {WORKERS} claims took the slot"
        )
        if round_ == ROUNDS - 1:  # the holder's step ends: its slot passes to one waiting step
            storage.free_concurrency_slot_for_step(claimed[0], "sft_adapter")
            waiting = [r for r in run_ids if r != claimed[0]]
            after = [
                r
                for r in waiting
                if storage.claim_concurrency_slot("train", r, "sft_adapter").is_claimed
            ]
            assert len(after) == 1, f"{len(after)} waiting steps took the freed slot"
        for r in run_ids:
            storage.free_concurrency_slots_for_run(r)
    info = storage.get_concurrency_info("train")
    assert info.slot_count == 1 and info.claimed_slots == [] and info.pending_steps == []


def test_the_production_instance_loads_the_serialising_storage(pg, tmp_path, monkeypatch):
    for var, value in {
        "HOST": "127.0.0.1",
        "PORT": str(pg.port),
        "DB": "dagster",
        "USERNAME": pg.user,
        "PASSWORD": pg.password,
    }.items():
        monkeypatch.setenv(f"DAGSTER_PG_{var}", value)
    (tmp_path / "dagster.yaml").write_text((ROOT / "deploy" / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.get() as instance:
        # Run workers rebuild the instance from its ref: they get the same storage.
        ref = instance.get_ref()
        assert ref.storage_data.class_name == SerialClaimPostgresStorage.__name__
        assert isinstance(instance.event_log_storage, SerialClaimEventLogStorage)
        instance.event_log_storage.set_concurrency_slots("train", 2)
        assert instance.event_log_storage.get_concurrency_info("train").slot_count == 2
