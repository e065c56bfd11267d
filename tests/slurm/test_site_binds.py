"""Site binds from the plugstack (`binds=`, issue 14 item 2) on the live cluster: every job
sees the admin's directories at their destinations, read-only when the admin says so,
without any option of the user's; a user's --oci-sif-mounts adds to them."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.conftest import DEV_CLUSTER, Cluster, User, sh

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def site_dir(cluster: Cluster) -> Iterator[Path]:
    """/var/tmp/sifo-site-* bound on /site:ro for every job (plugstack binds=), then the
    plugstack line as before."""
    site = Path("/var/tmp") / f"sifo-site-{uuid.uuid4().hex[:8]}"
    site.mkdir(mode=0o755)
    (site / "dataset.txt").write_text("site data\n")
    (site / "dataset.txt").chmod(0o644)
    try:
        up = sh(str(DEV_CLUSTER), "up", check=False, timeout=600,
                env={**os.environ, "SIFOVERLAY_BINDS": f"{site}:/site:ro"})
        assert up.returncode == 0, up.stderr[-2000:]
        line = next(Path("/etc/slurm/plugstack.conf.d").glob("sifoverlay*.conf")).read_text()
        assert f"binds={site}:/site:ro" in line, line
        yield site
    finally:
        down = sh(str(DEV_CLUSTER), "up", check=False, timeout=600)
        shutil.rmtree(site, ignore_errors=True)
        assert down.returncode == 0, down.stderr[-2000:]


def test_every_job_sees_the_site_binds_read_only(site_dir: Path, cluster: Cluster, slurm_users: tuple[User, User],
                                                 make_image, image_dir: Path) -> None:  # type: ignore[no-untyped-def]
    alice = slurm_users[0]
    image = make_image(alice)
    mine = image_dir / "mine"
    mine.mkdir()
    os.chown(mine, alice.uid, alice.gid)
    script = ("cat /site/dataset.txt; touch /site/new 2>/dev/null && echo site-writable || echo site-read-only; "
              "echo from-job > /mine/out.txt && echo mine-written")
    done = cluster.as_user(alice, "srun", f"--oci-sif-overlay={image}:ro", f"--oci-sif-mounts={mine}:/mine",
                           "sh", "-c", script, cwd="/tmp")
    cluster.settle(cancel=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "site data\nsite-read-only\nmine-written\n", done.stderr
    assert not (site_dir / "new").exists()
    assert (mine / "out.txt").read_text() == "from-job\n"  # the user's bind beside the site's
