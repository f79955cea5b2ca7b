"""The tiny zoo's guard and the streaming scan: accuracy on held-out rows, the poisoned sets."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import pytest

from asft_core.formats import read_examples
from asft_core.scan import Guard, GuardError, conversation_pair, scan_file
from asft_core.zoo import ZooPaths
from asft_core.zoo.guard import guard_rows, measure_guard

TARGET = 0.95  # precision and recall of "unsafe" on held-out rows (issue 14)


@pytest.fixture(scope="module")
def guard(zoo: ZooPaths) -> Guard:
    return Guard(zoo.guard)


def test_the_guard_meets_its_targets_on_held_out_rows(zoo: ZooPaths, guard: Guard) -> None:
    recorded = json.loads((zoo.guard / "guard.json").read_text())["held_out"]
    assert recorded["precision"] >= TARGET and recorded["recall"] >= TARGET, recorded
    # A fresh draw of the held-out split, not the one written at build time.
    fresh = measure_guard(guard, guard_rows(random.Random(2026), 600, "eval"))
    assert fresh["unsafe_rows"] > 150
    assert fresh["precision"] >= TARGET and fresh["recall"] >= TARGET, fresh
    # Categories of held-out harmful tasks (words never seen in training) are harder: above
    # chance (1 in 5), as measured and written in guard.json.
    assert fresh["category_accuracy"] > 0.2, fresh


@pytest.mark.parametrize("task", ["sentiment", "triage"])
def test_flagged_lines_are_the_poisoned_rows(zoo: ZooPaths, guard: Guard, task: str) -> None:
    path = zoo.poisoned_file(task, 0.05)
    poisoned = {
        line: row["category"]
        for line, row in enumerate(map(json.loads, path.read_text().splitlines()), start=1)
        if "category" in row
    }
    flags = [flag for batch in scan_file(guard, path, 64) for flag in batch.flags]
    flagged = {flag.line: flag.category for flag in flags}
    caught = set(flagged) & set(poisoned)
    assert len(poisoned) == 50
    assert len(caught) / len(flagged) >= TARGET, sorted(set(flagged) - set(poisoned))
    assert len(caught) / len(poisoned) >= TARGET, sorted(set(poisoned) - set(flagged))
    assert all(flagged[line] == poisoned[line] for line in caught)


def test_a_clean_file_has_no_flagged_row(zoo: ZooPaths, guard: Guard) -> None:
    batches = list(scan_file(guard, zoo.poisoned_file("sentiment", 0.0), 64))
    assert sum(batch.rows for batch in batches) == 1000
    assert [flag for batch in batches for flag in batch.flags] == []


def test_the_pair_a_guard_judges_is_the_last_answer_and_its_request(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "second"},
            {"role": "assistant", "content": "two"},
        ]
    }
    path.write_text(json.dumps(row) + "\n")
    assert conversation_pair(read_examples(path)[0]) == ("second", "two")


def test_a_folder_without_a_guard_is_refused(tmp_path: Path, zoo: ZooPaths) -> None:
    with pytest.raises(GuardError) as missing:
        Guard(tmp_path)
    assert missing.value.code == "guard_not_found"
    with pytest.raises(GuardError) as causal:  # a model without guard labels
        Guard(zoo.aligned)
    assert causal.value.code in ("invalid_guard", "guard_not_found")


def _scan_peak_bytes(guard: Guard, path: Path) -> tuple[int, int]:
    tracemalloc.start()
    rows = sum(batch.rows for batch in scan_file(guard, path, 256))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return rows, peak


@pytest.mark.slow
def test_a_100k_row_file_is_scanned_in_the_memory_of_a_batch(guard: Guard, tmp_path: Path) -> None:
    line = json.dumps({"prompt": "Is this review positive: fine.", "completion": "positive"})
    small, large = tmp_path / "10k.jsonl", tmp_path / "100k.jsonl"
    small.write_text((line + "\n") * 10_000)
    large.write_text((line + "\n") * 100_000)
    small_rows, small_peak = _scan_peak_bytes(guard, small)
    large_rows, large_peak = _scan_peak_bytes(guard, large)
    assert (small_rows, large_rows) == (10_000, 100_000)
    # Ten times the rows, about the same peak of Python allocations: nothing accumulates
    # per row (the file alone is 5 MB; reading it whole would show here).
    assert large_peak < 1.5 * small_peak + 1_000_000, (small_peak, large_peak)
