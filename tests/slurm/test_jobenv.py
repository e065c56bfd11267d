"""The job environment of real Slurm jobs (issue 14), by the same rules as
tests/runtime/test_jobenv_exec.py: host identity and network files, --oci-sif-mounts
(writable as the user, writes on the host, never in the overlay), the image's Env and
WorkingDir, --oci-sif-env / --oci-sif-cleanenv / --oci-sif-workdir and their env twins."""

from __future__ import annotations

import grp
import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.runtime import images
from tests.slurm.conftest import Cluster, User, sh

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.slow]

IMAGE_ENV = ["PATH=/usr/bin:/bin:/image/bin", "FROM_IMAGE=image", "SHARED=image", "KEEPME=image"]
CAPTURE = "/tmp/sifoverlay-H14-job-output.txt"  # the closing note quotes it


@pytest.fixture(scope="session")
def env_image_base(imported_image: Path) -> Path:
    """Busybox + the host's getent (a resolver that reads /etc/hosts) + an image Env and
    WorkingDir=/work, no overlay: ro jobs only."""
    work = imported_image.parent / "jobenv"
    work.mkdir()
    tree = images.busybox_rootfs(imported_image, work)
    (tree / "work").mkdir(mode=0o755)
    images.add_host_binaries(tree, ["getent"], extra_libs=("/lib/x86_64-linux-gnu/libnss_files.so.2",
                                                            "/lib/aarch64-linux-gnu/libnss_files.so.2"))
    return images.build_image(tree, work / "env.oci.sif", work / "journal", overlay=False,
                              image_config={"Env": IMAGE_ENV, "WorkingDir": "/work"})


@pytest.fixture
def env_image(env_image_base: Path, image_dir: Path) -> Path:
    target = image_dir / "env.oci.sif"
    sh("cp", "--sparse=always", str(env_image_base), str(target))
    target.chmod(0o644)
    return target


@pytest.fixture
def user_dir(image_dir: Path, slurm_users: tuple[User, User]) -> Path:
    """A directory of alice's outside the image (not in it: the fallback cwd)."""
    path = image_dir / f"alice-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    os.chown(path, slurm_users[0].uid, slurm_users[0].gid)
    return path


def test_job_sees_host_identity_and_network_files(cluster: Cluster, slurm_users: tuple[User, User],
                                                  env_image: Path, user_dir: Path) -> None:
    alice = slurm_users[0]
    job = cluster.sbatch(alice, f"--oci-sif-overlay={env_image}:ro", "-o", f"{user_dir}/%j.out",
                         "-e", f"{user_dir}/%j.err", "-D", "/tmp", "--wrap",
                         "id; cat /etc/resolv.conf | head -2; pwd; env | grep -c .; echo ---; "
                         "getent hosts localhost; getent hosts $(hostname)")
    assert cluster.wait_finished(job) == "COMPLETED", (user_dir / f"{job}.err").read_text()
    out = (user_dir / f"{job}.out").read_text()
    Path(CAPTURE).write_text(f"job {job} on {cluster.host}: id; cat /etc/resolv.conf | head -2; pwd; "
                             f"env | grep -c .\n{out}")
    head, resolved = out.split("---\n")
    lines = head.splitlines()
    primary = grp.getgrgid(alice.gid).gr_name
    assert lines[0] == f"uid={alice.uid}({alice.name}) gid={alice.gid}({primary}) groups={alice.gid}({primary})"
    resolv = Path("/etc/resolv.conf").read_text().splitlines()[:2]
    assert lines[1:1 + len(resolv)] == resolv
    assert lines[1 + len(resolv)] == "/tmp"  # the submit dir exists inside
    assert int(lines[2 + len(resolv)]) > 5

    def host_getent(name: str) -> str:
        return subprocess.run(["getent", "hosts", name], capture_output=True, text=True, check=True).stdout

    assert resolved == host_getent("localhost") + host_getent(socket.gethostname())
    assert (user_dir / f"{job}.err").read_text() == ""


def test_workdir_rules(cluster: Cluster, slurm_users: tuple[User, User], env_image: Path, user_dir: Path) -> None:
    alice = slurm_users[0]
    done = cluster.as_user(alice, "srun", f"--oci-sif-overlay={env_image}:ro", "pwd", cwd=str(user_dir))
    cluster.settle(cancel=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "/work\n"  # the image's WorkingDir
    assert done.stderr.strip().splitlines()[-1] == (
        f"sifoverlay: warning: {user_dir} does not exist in the image: working directory is /work")
    given = cluster.as_user(alice, "srun", f"--oci-sif-overlay={env_image}:ro", "--oci-sif-workdir=/etc", "pwd",
                            cwd=str(user_dir))
    cluster.settle(cancel=False)
    assert (given.returncode, given.stdout) == (0, "/etc\n"), given.stderr
    twin = cluster.as_user(alice, "srun", f"--oci-sif-overlay={env_image}:ro", "pwd", cwd="/tmp",
                           env={"OCI_SIF_WORKDIR": "/usr"})
    cluster.settle(cancel=False)
    assert (twin.returncode, twin.stdout) == (0, "/usr\n"), twin.stderr
    missing = cluster.as_user(alice, "srun", f"--oci-sif-overlay={env_image}:ro", "--oci-sif-workdir=/nowhere",
                              "pwd", cwd="/tmp")
    cluster.settle(cancel=False)
    assert missing.returncode != 0 and missing.stdout == ""
    assert "working directory /nowhere: No such file or directory in the image" in missing.stderr


def test_environment_rules(cluster: Cluster, slurm_users: tuple[User, User], env_image: Path) -> None:
    alice = slurm_users[0]
    job_env = {"SHARED": "job", "KEEPME": "job", "JOBONLY": "job"}
    done = cluster.as_user(alice, "srun", f"--oci-sif-overlay={env_image}:ro", "--oci-sif-env=KEEPME,SET=v=1",
                           "env", cwd="/tmp", env=job_env)
    cluster.settle(cancel=False)
    assert done.returncode == 0, done.stderr
    got = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert {k: got.get(k) for k in ("PATH", "SHARED", "KEEPME", "JOBONLY", "FROM_IMAGE", "SET")} == {
        "PATH": "/usr/bin:/bin:/image/bin", "SHARED": "image", "KEEPME": "job", "JOBONLY": "job",
        "FROM_IMAGE": "image", "SET": "v=1"}
    assert got["SLURM_JOB_ID"].isdigit() and got["USER"] == alice.name
    clean = cluster.as_user(alice, "srun", f"--oci-sif-overlay={env_image}:ro", "env", cwd="/tmp",
                            env={**job_env, "OCI_SIF_CLEANENV": "1", "OCI_SIF_ENV": "FROM_IMAGE=twin"})
    cluster.settle(cancel=False)
    assert clean.returncode == 0, clean.stderr
    got = dict(line.split("=", 1) for line in clean.stdout.splitlines() if "=" in line)
    assert "JOBONLY" not in got and got["SHARED"] == "image" and got["FROM_IMAGE"] == "twin"
    assert got["SLURM_JOB_ID"].isdigit() and got["PATH"] == "/usr/bin:/bin:/image/bin"
    assert not [k for k in got if not (k in ("HOME", "USER", "LOGNAME", "TERM", "LANG", "LANGUAGE", "LC_ALL", "TZ",
                                              "TMPDIR", "PATH", "SHARED", "KEEPME", "FROM_IMAGE")
                                       or k.startswith(("LC_", "SLURM_", "SLURMD_", "PMI_", "PMIX_", "OMPI_")))]


def test_bound_scratch_is_writable_and_the_overlay_holds_only_the_job(
        cluster: Cluster, slurm_users: tuple[User, User], make_image, user_dir: Path,  # type: ignore[no-untyped-def]
        tmp_path: Path) -> None:
    require_tool("debugfs")
    alice = slurm_users[0]
    with_bind = make_image(alice, "bind.oci.sif")
    without = make_image(alice, "plain.oci.sif")
    scratch = user_dir / "scratch"
    scratch.mkdir()
    os.chown(scratch, alice.uid, alice.gid)
    shared = user_dir / "shared"
    shared.mkdir()
    (shared / "input").write_text("dataset\n")
    job = "echo made > /job-file"  # (/tmp is the host's in a Slurm job)
    done = cluster.as_user(alice, "srun", f"--oci-sif-overlay={with_bind}",
                           f"--oci-sif-mounts={scratch}:/scratch,{shared}:/data/in:ro", "sh", "-c",
                           f"{job}; echo out > /scratch/out; cat /data/in/input; "
                           "(echo x > /data/in/nope) 2>/dev/null || echo ro-refused; id -un", cwd="/tmp")
    cluster.settle(cancel=False)
    assert (done.returncode, done.stdout) == (0, f"dataset\nro-refused\n{alice.name}\n"), done.stderr
    out = scratch / "out"
    assert out.read_text() == "out\n" and (out.stat().st_uid, out.stat().st_gid) == (alice.uid, alice.gid)
    plain = cluster.as_user(alice, "srun", f"--oci-sif-overlay={without}", "sh", "-c", job, cwd="/tmp",
                            env={"OCI_SIF_NO_HOME": "1"})
    cluster.settle(cancel=False)
    assert plain.returncode == 0, plain.stderr
    assert images.overlay_tree(with_bind, tmp_path) == images.overlay_tree(without, tmp_path)
    # and the comparison can fail: one more file in the overlay changes it
    more = cluster.as_user(alice, "srun", f"--oci-sif-overlay={without}", "sh", "-c", "echo 1 > /x", cwd="/tmp")
    cluster.settle(cancel=False)
    assert more.returncode == 0, more.stderr
    assert images.overlay_tree(with_bind, tmp_path) != images.overlay_tree(without, tmp_path)


def test_bind_source_is_checked_as_the_job_user(cluster: Cluster, slurm_users: tuple[User, User],
                                               make_image, user_dir: Path) -> None:  # type: ignore[no-untyped-def]
    alice = slurm_users[0]
    image = make_image(alice)
    private = user_dir / "root-only"
    private.mkdir(mode=0o700)  # root's: alice cannot enter it
    (private / "data").mkdir()
    done = cluster.as_user(alice, "srun", f"--oci-sif-overlay={image}", f"--oci-sif-mounts={private}/data:/d",
                           "true", cwd="/tmp")
    cluster.settle(cancel=False)
    assert done.returncode != 0
    assert f"{private}/data: bind source does not exist or is not readable by uid {alice.uid}" in done.stderr
    bad = cluster.as_user(alice, "srun", f"--oci-sif-overlay={image}", "--oci-sif-mounts=relative:/d", "true",
                          cwd="/tmp")
    assert bad.returncode != 0 and "bad mount 'relative:/d'" in bad.stderr, bad.stderr


def test_bind_source_swapped_for_a_symlink_after_the_prolog(cluster: Cluster, slurm_users: tuple[User, User],
                                                           make_image, user_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """The attack: the Prolog checked alice's bind source; she then replaces it with a
    symlink to a directory only root may read and starts a step. The task opens the source
    with her credentials: the step fails, root's directory is not bound."""
    alice = slurm_users[0]
    image = make_image(alice)
    secret = user_dir.parent / "root-secret"
    secret.mkdir(mode=0o700)
    (secret / "key").write_text("root's\n")
    src = user_dir / "src"
    src.mkdir()
    (src / "mine").write_text("alice's\n")
    os.chown(src, alice.uid, alice.gid)
    done = cluster.as_user(alice, "salloc", f"--oci-sif-overlay={image}", f"--oci-sif-mounts={src}:/x", "sh", "-c",
                           f"srun cat /x/mine; mv {src} {src}.old && ln -s {secret} {src}; "
                           "srun cat /x/key; echo step-exit=$?", cwd="/tmp")
    cluster.settle(cancel=False)
    assert "alice's\n" in done.stdout and "root's" not in done.stdout, done.stdout + done.stderr
    assert "step-exit=0" not in done.stdout
    assert f"bind source {src}: Permission denied (as the job user)" in done.stderr, done.stderr
