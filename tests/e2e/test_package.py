"""The Debian package of this tree, as `slurm_plugin/dev-cluster up` builds and installs it
(every Slurm test runs on it): installed, current, complete, and the files it ships work."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, require_root, require_tool

pytestmark = [pytest.mark.slurm, pytest.mark.root]

DEV_CLUSTER = REPO / "slurm_plugin" / "dev-cluster"


def sh(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # cwd=/: `python -c` puts the working directory first on sys.path (the repo would shadow /opt)
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, cwd="/")


@pytest.fixture(scope="module")
def installed() -> str:
    """dev-cluster up (idempotent: rebuilds and reinstalls the package when the tree changed)."""
    require_root()
    require_tool("dpkg-deb", "dpkg-query", "slurmd")
    up = sh(str(DEV_CLUSTER), "up", timeout=900)
    assert up.returncode == 0, up.stderr[-3000:]
    return sh(str(REPO / "packaging" / "build-deb.sh"), "--source-id").stdout.strip()


def test_installed_package_is_built_from_this_tree(installed: str) -> None:
    status = sh("dpkg-query", "-W", "-f=${Status} ${Version} ${Architecture}", "sifoverlay")
    assert status.stdout.startswith("install ok installed 0.1.0-1 "), status
    assert Path("/usr/share/sifoverlay/source-id").read_text().strip() == installed
    verify = sh("dpkg", "--verify", "sifoverlay")  # md5sums of every shipped file
    assert (verify.returncode, verify.stdout) == (0, "")


def test_package_contents(installed: str) -> None:
    files = set(sh("dpkg-query", "-L", "sifoverlay").stdout.split())
    for path in ("/usr/lib/sifoverlay/sifoverlay_spank.so", "/usr/lib/sifoverlay/prolog", "/usr/lib/sifoverlay/epilog",
                 "/usr/bin/sifoverlay", "/opt/sifoverlay/bin/python",
                 "/lib/systemd/system/sifoverlay-slurm-sweeper.service",
                 "/lib/systemd/system/sifoverlay-slurm-sweeper.timer",
                 "/lib/systemd/system/sifoverlay-exporter.service", "/etc/default/sifoverlay-exporter",
                 "/usr/share/doc/sifoverlay/examples/plugstack-sifoverlay.conf",
                 "/usr/share/doc/sifoverlay/examples/slurmd-sifoverlay-sweeper.conf",
                 "/usr/share/doc/sifoverlay/copyright", "/usr/share/doc/sifoverlay/install.md", "/var/lib/sifoverlay"):
        assert path in files, path
    st = os.stat("/var/lib/sifoverlay")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o755)
    for hook in ("prolog", "epilog"):
        text = Path(f"/usr/lib/sifoverlay/{hook}").read_text()
        assert "@PYTHON@" not in text and "@RUNTIME_DIR@" not in text
        assert f"/opt/sifoverlay/bin/python -m sifoverlay.slurm.{hook}" in text
    example = Path("/usr/share/doc/sifoverlay/examples/plugstack-sifoverlay.conf").read_text().splitlines()
    assert sum(line.startswith("required /usr/lib/sifoverlay/sifoverlay_spank.so ") for line in example) == 1
    assert sum(line.startswith("#") for line in example) >= 5  # every key explained
    # nothing of the build host's staging directory is left in the venv
    leftovers = sh("grep", "-rl", "sifoverlay-deb.", "/opt/sifoverlay")
    assert leftovers.stdout == ""


def test_packaged_python_runs_the_tree_version(installed: str) -> None:
    done = sh("/opt/sifoverlay/bin/python", "-c",
              "import sifoverlay, prometheus_client; print(sifoverlay.__file__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "/opt/sifoverlay/lib/python3.11/site-packages/sifoverlay/__init__.py"
    cli = sh("/usr/bin/sifoverlay", "--help")
    assert cli.returncode == 0 and "overlay" in cli.stdout
    for hook in ("sifoverlay.slurm.prolog", "sifoverlay.slurm.epilog", "sifoverlay.slurm.sweeper"):
        found = sh("/opt/sifoverlay/bin/python", "-c", f"import importlib.util as u; print(u.find_spec({hook!r}) is not None)")
        assert found.stdout.strip() == "True", hook


def test_dev_cluster_runs_from_the_package(installed: str) -> None:
    conf = Path("/etc/slurm/slurm.conf").read_text().splitlines()
    assert "Prolog=/usr/lib/sifoverlay/prolog" in conf and "Epilog=/usr/lib/sifoverlay/epilog" in conf
    plugstack = Path("/etc/slurm/plugstack.conf.d/sifoverlay.conf").read_text()
    assert plugstack.startswith("required /usr/lib/sifoverlay/sifoverlay_spank.so ")
    assert " sifoverlay=/opt/sifoverlay/bin/python " in f"{plugstack.strip()} "
    # sbatch loads the plugin the plugstack names: the package's file (dpkg --verify: unchanged)
    helped = sh("sbatch", "--help")
    assert "--oci-sif-overlay=PATH[:rw|:ro]" in helped.stdout
    assert not Path("/etc/slurm/sifoverlay").exists()  # no hooks of the tree's own
