"""How a job ended, as the revision records it (sifoverlay/slurm/jobwho.py), from the
fields `scontrol show job -o` prints (during the Epilog the job is still COMPLETING)."""

from __future__ import annotations

import pytest

from sifoverlay.slurm.jobwho import _FIELD, exit_state_of


@pytest.mark.parametrize("fields,expected", [
    ({"JobState": "COMPLETING", "ExitCode": "0:0"}, "COMPLETED"),
    ({"JobState": "COMPLETING", "ExitCode": "3:0"}, "FAILED (exit 3)"),
    ({"JobState": "COMPLETING", "ExitCode": "0:9"}, "KILLED (signal 9)"),
    ({"JobState": "COMPLETING", "ExitCode": "0:15"}, "KILLED (signal 15)"),
    ({"JobState": "CANCELLED", "ExitCode": "0:15"}, "CANCELLED (signal 15)"),
    ({"JobState": "TIMEOUT", "ExitCode": "0:0"}, "TIMEOUT"),
    ({"JobState": "FAILED", "ExitCode": "1:0"}, "FAILED (exit 1)"),
    ({"JobState": "COMPLETING"}, None),
    ({}, None),
])
def test_exit_state(fields: dict[str, str], expected: str | None) -> None:
    assert exit_state_of(fields) == expected


def test_fields_of_a_one_line_job_record() -> None:
    line = "JobId=17 JobName=wrap UserId=alice(1001) JobState=COMPLETING Reason=None ExitCode=0:9 Nodes=vm\n"
    fields = dict(_FIELD.findall(line))
    assert fields["JobState"] == "COMPLETING" and fields["ExitCode"] == "0:9"
    assert exit_state_of(fields) == "KILLED (signal 9)"
