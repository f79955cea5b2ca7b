"""The artifact store removes what a killed writer left, and nothing else."""

from __future__ import annotations

from pathlib import Path

from service.storage import ArtifactStore, job_key


def test_temporaries_a_killed_writer_left_are_removed_and_nothing_else(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    job = store.path(job_key("ftjob-abc"))
    (job / "checkpoints" / "step-2").mkdir(parents=True)
    (job / "checkpoints" / "step-2" / "adapter_model.safetensors").write_bytes(b"kept")
    staging = job / "checkpoints" / ".step-4-x1y2"  # a checkpoint cut off mid-write
    staging.mkdir()
    (staging / ".rng-part").write_bytes(b"partial")
    (job / ".write-q9").write_bytes(b"partial")
    other = store.path(job_key("ftjob-other"))
    other.mkdir(parents=True)
    (other / ".write-live").write_bytes(b"another job's write")
    assert store.remove_temporaries(job_key("ftjob-abc")) == 3
    assert sorted(p.relative_to(job).as_posix() for p in job.rglob("*")) == [
        "checkpoints",
        "checkpoints/step-2",
        "checkpoints/step-2/adapter_model.safetensors",
    ]
    assert (other / ".write-live").exists()
    assert store.remove_temporaries(job_key("ftjob-missing")) == 0
