"""--oci-sif-overlay on sbatch/srun/salloc: registered everywhere, validated where the user
submits (the submission fails with the plugin's message and nothing is queued), the
environment twin OCI_SIF_OVERLAY, and strict plugstack keys."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.slurm.conftest import Cluster, User, sh

pytestmark = [pytest.mark.slurm, pytest.mark.root]

PREFIX = "error: sifoverlay: "


@pytest.mark.parametrize("command", ["sbatch", "srun", "salloc"])
def test_option_is_in_help(cluster: Cluster, command: str) -> None:
    done = sh(command, "--help", check=False)
    assert "--oci-sif-overlay=PATH[:rw|:ro]" in done.stdout
    assert "[sifoverlay]" in done.stdout


def _queued(user: User) -> list[str]:
    return sh("squeue", "-h", "-u", user.name, "-o", "%i", check=False).stdout.split()


BAD_VALUES = [
    ("relative", "relative.oci.sif", "--oci-sif-overlay=relative.oci.sif: not an absolute path"),
    ("relative-with-mode", "img.oci.sif:ro", "--oci-sif-overlay=img.oci.sif:ro: not an absolute path"),
    ("missing", "{dir}/missing.oci.sif",
     "--oci-sif-overlay: {dir}/missing.oci.sif: cannot open for reading: No such file or directory"),
    ("native-sif", "{native}", "--oci-sif-overlay: {native}: not an OCI-SIF (a SIF without an OCI root index)"),
    ("not-a-sif", "{text}", "--oci-sif-overlay: {text}: not a SIF image (no SIF magic)"),
    ("directory", "{dir}", "--oci-sif-overlay: {dir}: not a regular file"),
    ("unknown-mode", "{image}:rx", "--oci-sif-overlay={image}:rx: unknown mode 'rx' (expected :rw or :ro)"),
    ("empty", "", "--oci-sif-overlay needs a value"),
]


@pytest.fixture
def bad_inputs(image_dir: Path, make_image, slurm_users: tuple[User, User], vectors: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    alice = slurm_users[0]
    native = image_dir / "native.sif"
    native.write_bytes((vectors / "sif" / "one-group.sif").read_bytes())  # a native SIF (Debian's sylabs/sif)
    text = image_dir / "notes.txt"
    text.write_text("hello\n" * 100)
    for path in (native, text):
        os.chmod(path, 0o644)
    return {"dir": str(image_dir), "native": str(native), "text": str(text), "image": str(make_image(alice))}


@pytest.mark.parametrize("case,value,message", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_bad_value_fails_sbatch_with_plugin_message(cluster: Cluster, slurm_users: tuple[User, User],
                                                     bad_inputs: dict[str, str], case: str, value: str,
                                                     message: str) -> None:
    alice = slurm_users[0]
    before = _queued(alice)
    done = cluster.as_user(alice, "sbatch", f"--oci-sif-overlay={value.format(**bad_inputs)}", "--wrap", "true",
                           cwd="/tmp")
    assert done.returncode == 255, done.stderr
    assert f"sbatch: {PREFIX}{message.format(**bad_inputs)}" in done.stderr
    assert _queued(alice) == before  # nothing was submitted


@pytest.mark.parametrize("command", ["srun", "salloc"])
def test_bad_value_fails_srun_and_salloc(cluster: Cluster, slurm_users: tuple[User, User],
                                         bad_inputs: dict[str, str], command: str) -> None:
    done = cluster.as_user(slurm_users[0], command, f"--oci-sif-overlay={bad_inputs['text']}", "true", cwd="/tmp")
    assert done.returncode == 255
    assert f"{command}: {PREFIX}--oci-sif-overlay: {bad_inputs['text']}: not a SIF image (no SIF magic)" in done.stderr


def test_unreadable_image_fails_for_that_user(cluster: Cluster, slurm_users: tuple[User, User], make_image) -> None:  # type: ignore[no-untyped-def]
    alice, bob = slurm_users
    private = make_image(alice, "private.oci.sif", mode=0o600)
    done = cluster.as_user(bob, "sbatch", f"--oci-sif-overlay={private}", "--wrap", "true", cwd="/tmp")
    assert done.returncode == 255
    assert f"{PREFIX}--oci-sif-overlay: {private}: cannot open for reading: Permission denied" in done.stderr


def test_valid_values_pass_validation(cluster: Cluster, slurm_users: tuple[User, User], make_image) -> None:  # type: ignore[no-untyped-def]
    alice = slurm_users[0]
    image = make_image(alice)
    for value in (str(image), f"{image}:rw", f"{image}:ro"):
        done = cluster.as_user(alice, "sbatch", "--test-only", f"--oci-sif-overlay={value}", "--wrap", "true",
                               cwd="/tmp")
        assert done.returncode == 0, done.stderr
        assert "sifoverlay" not in done.stderr


def test_environment_twin_is_validated_too(cluster: Cluster, slurm_users: tuple[User, User],
                                           bad_inputs: dict[str, str]) -> None:
    alice = slurm_users[0]
    done = cluster.as_user(alice, "sbatch", "--wrap", "true", cwd="/tmp",
                           env={"OCI_SIF_OVERLAY": bad_inputs["text"]})
    assert done.returncode != 0
    assert f"{PREFIX}OCI_SIF_OVERLAY: {bad_inputs['text']}: not a SIF image (no SIF magic)" in done.stderr
    ok = cluster.as_user(alice, "sbatch", "--test-only", "--wrap", "true", cwd="/tmp",
                         env={"OCI_SIF_OVERLAY": bad_inputs["image"] + ":ro"})
    assert ok.returncode == 0, ok.stderr


def test_flag_wins_over_environment_twin(cluster: Cluster, slurm_users: tuple[User, User],
                                         bad_inputs: dict[str, str]) -> None:
    """A bad OCI_SIF_OVERLAY is ignored when the flag is given (the twin only fills in)."""
    done = cluster.as_user(slurm_users[0], "sbatch", "--test-only", f"--oci-sif-overlay={bad_inputs['image']}",
                           "--wrap", "true", cwd="/tmp", env={"OCI_SIF_OVERLAY": bad_inputs["text"]})
    assert done.returncode == 0, done.stderr


# -- plugstack strictness: a private slurm.conf copy, so the running cluster is untouched ---------
def _private_conf(where: Path, plugin_args: str) -> dict[str, str]:
    """slurm.conf + plugstack copies readable by the test users (pytest's tmp is 0700)."""
    plugstack = where / "plugstack.conf"
    plugstack.write_text(f"required /usr/lib/sifoverlay/sifoverlay_spank.so {plugin_args}\n")
    conf = Path("/etc/slurm/slurm.conf").read_text()
    conf = re.sub(r"(?m)^PlugStackConfig=.*$", f"PlugStackConfig={plugstack}", conf)
    slurm_conf = where / "slurm.conf"
    slurm_conf.write_text(conf)
    for p in (plugstack, slurm_conf):
        os.chmod(p, 0o644)
    return {"SLURM_CONF": str(slurm_conf)}


PLUGSTACK_ERRORS = [
    ("unknown-key", "journal_dir=/var/tmp/j colour=blue", "plugstack: unknown key 'colour'"),
    ("bad-mode", "default_mode=rx", "plugstack: default_mode=rx: expected rw or ro"),
    ("bad-mount", "mount=nfs", "plugstack: mount=nfs: expected fuse or kernel"),
    ("relative-root", "image_roots=/ok:images", "plugstack: image_roots=images: not an absolute path"),
    ("not-key-value", "verbose", "plugstack: argument 'verbose' is not key=value"),
    ("dotdot", "runtime_dir=/run/../etc", "plugstack: runtime_dir=/run/../etc: '..' is not allowed"),
    ("relative-state", "state_dir=state", "plugstack: state_dir=state: not an absolute path"),
    ("bad-size", "max_overlay=12X", "plugstack: max_overlay=12X: expected a positive number (optionally with K, M, G or T)"),
    ("zero-deadline", "hash_deadline=0", "plugstack: hash_deadline=0: must be positive"),
    ("bad-epilog-reconcile", "epilog_reconcile=later", "plugstack: epilog_reconcile=later: expected async or sync"),
    ("bad-prolog-mounts", "prolog_mounts=later", "plugstack: prolog_mounts=later: expected detached or inline"),
]


@pytest.mark.parametrize("case,args,message", PLUGSTACK_ERRORS, ids=[c[0] for c in PLUGSTACK_ERRORS])
def test_plugstack_keys_are_strict(cluster: Cluster, slurm_users: tuple[User, User], image_dir: Path,
                                   case: str, args: str, message: str) -> None:
    done = cluster.as_user(slurm_users[0], "sbatch", "--test-only", "--wrap", "true", cwd="/tmp",
                           env=_private_conf(image_dir, args))
    assert done.returncode != 0
    assert f"{PREFIX}{message}" in done.stderr


def test_plugstack_all_keys_accepted(cluster: Cluster, slurm_users: tuple[User, User], image_dir: Path) -> None:
    args = ("journal_dir=/var/lib/sifoverlay/journal runtime_dir=/run/sifoverlay image_roots=/a:/b "
            "default_mode=ro sifoverlay=/usr/bin/python3 mount=kernel state_dir=/var/lib/sifoverlay "
            "max_overlay=256G hash_deadline=600 epilog_reconcile=sync prolog_mounts=inline")
    done = cluster.as_user(slurm_users[0], "sbatch", "--test-only", "--wrap", "true", cwd="/tmp",
                           env=_private_conf(image_dir, args))
    assert done.returncode == 0, done.stderr


def test_slurmd_refuses_to_start_with_a_bad_plugstack_key(cluster: Cluster, image_dir: Path) -> None:
    """The loud failure happens where the admin sees it: slurmd start-up. A second slurmd
    with private pid file, spool and port (the running one is untouched)."""
    env = _private_conf(image_dir, "journal_dir=/var/tmp/j colour=blue")
    conf_path = Path(env["SLURM_CONF"])
    spool = image_dir / "spool"
    spool.mkdir()
    conf = conf_path.read_text()
    for key, value in (("SlurmdPidFile", image_dir / "slurmd.pid"), ("SlurmdSpoolDir", spool),
                       ("SlurmdLogFile", image_dir / "slurmd.log"), ("SlurmdPort", "1")):
        conf = re.sub(rf"(?m)^{key}=.*$", f"{key}={value}", conf)
    conf_path.write_text(conf)
    done = sh("/usr/sbin/slurmd", "-D", "-f", str(conf_path), "-N", cluster.host, check=False, timeout=60)
    assert done.returncode != 0
    log = (image_dir / "slurmd.log").read_text() + done.stderr
    assert "sifoverlay: plugstack: unknown key 'colour'" in log
    assert "slurmd initialization failed" in log
    state = cluster.node_state()  # the running slurmd is untouched (other users' jobs may run)
    assert "drain" not in state and "down" not in state and "not_responding" not in state, state
