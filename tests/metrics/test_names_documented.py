"""docs/metrics.md and the names table (sifoverlay/metrics/names.py) agree: every metric in
the table has a reference row with its type and labels, and every row names a metric
of the table."""

from __future__ import annotations

import re
from pathlib import Path

from sifoverlay.metrics import names

ROW = re.compile(r"^\| `(sifoverlay_[a-z_]+)` \| ([a-z ()]+) \| (.*?) \| .* \|$")


def _exposed(spec: names.MetricSpec) -> str:
    """The name a reader finds in /metrics for the spec's main sample."""
    return spec.name + "_info" if spec.type == names.INFO else spec.sample_name


def _doc_type(spec: names.MetricSpec) -> str:
    return "gauge (info)" if spec.type == names.INFO else spec.type


def _rows(repo_root: Path) -> list[tuple[str, str, str]]:
    text = (repo_root / "docs" / "metrics.md").read_text()
    return [m.groups() for line in text.splitlines() if (m := ROW.match(line))]  # type: ignore[misc]


def test_every_metric_of_the_table_is_documented_with_its_type_and_labels(repo_root: Path) -> None:
    rows = _rows(repo_root)
    assert len(rows) >= len(names.ALL)
    for spec in names.ALL:
        matching = [(t, labels) for name, t, labels in rows if name == _exposed(spec)]
        assert matching, f"{_exposed(spec)} has no row in docs/metrics.md"
        for doc_type, labels in matching:
            assert doc_type == _doc_type(spec), (spec.name, doc_type)
            documented = set(re.findall(r"`([a-z_]+)(?:`|=)", labels))  # `name` or `name="value"`
            if spec.labels:
                assert set(spec.labels) <= documented, (spec.name, labels)
            else:
                assert labels.strip() == "-", (spec.name, labels)


def test_every_documented_metric_is_in_the_table(repo_root: Path) -> None:
    known = {_exposed(spec) for spec in names.ALL}
    unknown = sorted({name for name, _, _ in _rows(repo_root)} - known)
    assert not unknown, f"docs/metrics.md documents metrics missing from names.py: {unknown}"


def test_slurm_job_end_results_are_documented(repo_root: Path) -> None:
    row = next(labels for name, _, labels in _rows(repo_root) if name == names.SLURM_JOB_END.name)
    assert re.findall(r"`([a-z-]+)`", row.split("=", 1)[1]) == list(names.JOB_END_RESULTS)
