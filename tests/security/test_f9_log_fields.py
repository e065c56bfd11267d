"""Issue 12, finding 9: a user-chosen value (the image path from --oci-sif-overlay, a job
id, an error message naming a file) must never forge a line or a field in the Slurm log.

The real Epilog entry point runs with an image path that carries a newline followed by
a complete fake log line; the log file must contain only lines the Epilog wrote, each
with exactly one timestamp/level/op prefix, and the forged text must appear escaped.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from sifoverlay.slurm import logsetup

FORGED = "2026-01-01T00:00:00 level=info op=epilog job=1 msg=\"victim image reconciled\""
LINE = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d level=(debug|info|warning|error|critical) op=(prolog|epilog|sweeper) ')


def _fields(line: str) -> list[str]:
    """key=value tokens outside double quotes (a value may be "quoted \\"like\\" this")."""
    return re.findall(r'(?:^|\s)([a-z_]+)=(?:"(?:[^"\\]|\\.)*"|\S*)', line)


def test_epilog_log_lines_cannot_be_forged_through_the_image_path(tmp_path: Path) -> None:
    log_file = tmp_path / "slurm.log"
    plugstack = tmp_path / "plugstack.conf"
    plugstack.write_text(f"optional /nonexistent/sifoverlay_spank.so journal_dir={tmp_path / 'journal'} "
                         f"runtime_dir={tmp_path / 'run'}\n")
    image = f"/tmp/evil\n{FORGED}\n.sif"
    env = {
        **os.environ, "SLURM_JOB_ID": "4242", "SPANK_OCI_SIF_OVERLAY": f"{image}:rw",
        logsetup.ENV_LOG_FILE: str(log_file), "SIFOVERLAY_PLUGSTACK": str(plugstack),
    }
    proc = subprocess.run([sys.executable, "-m", "sifoverlay.slurm.epilog"], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    text = log_file.read_text()
    lines = text.splitlines()
    assert lines, "the Epilog wrote nothing to its log"
    for line in lines:
        assert LINE.match(line), f"forged or broken log line: {line!r}"
        keys = _fields(line)
        assert keys.count("level") == 1 and keys.count("op") == 1 and keys.count("msg") <= 1, line
    assert not any(line.startswith("2026-01-01T00:00:00") for line in lines)
    # the value is still there, escaped, on the line that carries it
    assert any("image=\"/tmp/evil\\n2026-01-01T00:00:00 level=info" in line for line in lines), text
    assert proc.stderr.count("\n") == len(lines)  # stderr gets the same lines


def test_formatter_escapes_fields_and_message() -> None:
    formatter = logsetup._KeyValue("prolog", {"job": "7", "image": "/a b/c\"d\x1b[2J\r\nlevel=error"})
    record = logging.LogRecord("sifoverlay.x", logging.WARNING, __file__, 1, 'cannot open %s: "%s"',
                               ("/p\nq", "x\" op=forged"), None)
    line = formatter.format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert LINE.match(line)
    assert [k for k in _fields(line)] == ["level", "op", "job", "image", "logger", "msg"]
    assert 'image="/a b/c\\"d\\x1b[2J\\r\\nlevel=error"' in line
    assert line.endswith('msg="cannot open /p\\nq: \\"x\\" op=forged\\""')
    plain = logsetup._KeyValue("epilog", {"job": "12", "image": "/plain/path.sif"})
    assert " job=12 image=/plain/path.sif " in plain.format(record)
