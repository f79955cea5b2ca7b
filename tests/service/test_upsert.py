"""The one-statement upsert, on SQLite and PostgreSQL: insert once, then update in place."""

from __future__ import annotations

from sqlalchemy import select

from service.db.models import Checkpoint, Job, ModelPair, Team, new_id, now
from service.db.session import engine_for, transaction
from service.db.upsert import upsert


def _job(url: str) -> str:
    job_id = new_id("ftjob")
    with transaction(engine_for(url)) as session:
        team = Team(id=new_id("team"), name=f"team-{job_id}")
        session.add(team)
        session.add(ModelPair(id=f"pair-{job_id}", aligned_model="a", base_model="b"))
        session.flush()
        session.add(
            Job(
                id=job_id,
                team_id=team.id,
                model=f"pair-{job_id}",
                training_file="file-x",
                status="running",
                method={"type": "supervised", "supervised": {"hyperparameters": {}}},
                seed=1,
            )
        )
    return job_id


def test_upsert_inserts_then_updates_in_place(database_url: str) -> None:
    job_id = _job(database_url)
    engine = engine_for(database_url)
    for storage_key in ("first", "second"):
        with transaction(engine) as session:
            upsert(
                session,
                Checkpoint,
                {
                    "id": new_id("ftckpt"),
                    "job_id": job_id,
                    "step": 4,
                    "metrics": {"k": 1},
                    "storage_key": storage_key,
                    "created_at": now(),
                },
                conflict=("job_id", "step"),
                update=("storage_key",),
            )
    with transaction(engine) as session:
        rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
        assert [(row.step, row.storage_key) for row in rows] == [(4, "second")]
        first_id = rows[0].id
    with transaction(engine) as session:  # no update columns: the existing row is kept
        upsert(
            session,
            Checkpoint,
            {
                "id": new_id("ftckpt"),
                "job_id": job_id,
                "step": 4,
                "metrics": {},
                "storage_key": "third",
                "created_at": now(),
            },
            conflict=("job_id", "step"),
        )
    with transaction(engine) as session:
        row = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).one()
        assert (row.id, row.storage_key) == (first_id, "second")
