"""Assemble a job's rootfs from an OCI-SIF, tear it down, find leftovers.

Threat model (issue 4): the image is user-controlled and the kernel's squashfs/ext3
drivers are not hardened against crafted images, so by default root never kernel-mounts
anything from an image:

* mode "fuse" (default): `squashfuse -o offset=N` per squashfs layer, `fuse2fs -o
  offset=N,fakeroot` for the ext3 overlay and `fuse-overlayfs` on top all run AS THE JOB
  USER (what SingularityCE's OCI mode does), mounted allow_other so root can enter the
  rootfs (needs ``user_allow_other`` in /etc/fuse.conf). Root's part parses nothing in
  the kernel: validation (sifoverlay.ocisif, superblock), the lease, e2fsck (userspace).
* mode "kernel" (admin opt-in for trusted images): loop devices + squashfs/ext3 kernel
  mounts + kernel overlayfs, all nosuid,nodev. A userspace `e2fsck -fn` of the ext3 runs
  first so that a plainly corrupt filesystem never reaches the kernel driver.

Swap safety: the image is opened ONCE with O_NOFOLLOW and validated through that fd; the
helpers get ``/proc/self/fd/N`` (the fd is inherited), and loop devices are bound to the
fd itself (LOOP_CONFIGURE), so renaming another file over the image path after validation
redirects nothing. What could not be made fd-based: nothing on the mount path; the
caller's lease file is by name (it is a lock, not data).

Limitation (fuse mode): an unprivileged fuse-overlayfs cannot read ``trusted.*`` xattrs
of lower files (the kernel answers ENODATA), so copy-up of such files fails; images
whose layers carry trusted.* xattrs need kernel mode or a re-import without xattrs.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from sifoverlay.engine.procs import process_start_ticks
from sifoverlay.errors import ExternalToolError, OverlayStateError, UsageError
from sifoverlay.fsio import REAL_IO, FileIO

from . import jobview, mounts, state, validate
from .state import JobState, Step
from .validate import Region

if TYPE_CHECKING:
    from .copyup import UserChild

log = logging.getLogger(__name__)

MODES = ("fuse", "kernel")


@dataclass(frozen=True, slots=True)
class Rootfs:
    """An assembled rootfs: `path` is the merged tree to chroot into."""

    job_id: str
    path: str
    base_dir: str
    image: str
    mode: str
    writable: bool
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class TeardownReport:
    job_id: str
    unmounted: tuple[str, ...]
    signalled: tuple[int, ...]  # FUSE daemons that had to be killed
    removed: bool  # the job directory is gone


def assemble(
    image: str | os.PathLike[str], job_id: str, *, writable: bool, mode: str = "fuse", uid: int, gid: int,
    base_dir: str | os.PathLike[str], image_fd: int | None = None, hold_fds: Sequence[int] = (),
    mountpoints: Sequence[tuple[str, bool]] = (), io: FileIO = REAL_IO, copyup_child: UserChild | None = None,
) -> Rootfs:
    """Mount the image's layers (+ overlay) for `job_id` under ``base_dir/<job_id>/``.

    `image_fd`: an fd the caller already opened with O_NOFOLLOW (else the path is opened
    so). `hold_fds`: fds inherited by the ext3 FUSE daemon (fuse mode), e.g. the lease's
    OFD lock fd, so the byte-range lock lives exactly as long as the ext3 mount.
    `mountpoints`: (path, is_dir) the job view binds onto; those the image lacks come from
    a stub layer under the image's layers (runtime.jobview), never from the overlay.
    `copyup_child`: a copy-up child of the job user started earlier (copyup.UserChild), used
    by a rw FUSE assembly; the caller cancels it afterwards.
    On any failure everything already set up is torn down before the error propagates.
    """
    path = os.path.abspath(os.fspath(image))
    if mode not in MODES:
        raise UsageError(None, f"mount mode must be one of {', '.join(MODES)}, not {mode!r}")
    job = state.check_job_id(job_id)
    validate.preflight(mode, uid)
    fd = validate.open_image(path, image_fd, rw=writable and mode == "kernel")
    try:
        layers, overlay = validate.validate(path, fd, writable)
        validate.check_user_access(path, fd, uid, gid, writable)
        directory = state.job_dir(base_dir, job)
        _make_job_dir(base_dir, directory, io)
        st = os.fstat(fd)
        current = state.new_state(job, path, st, mode=mode, writable=writable, uid=uid, gid=gid)
        state.save(base_dir, current, io=io)
        try:
            if overlay is not None:
                validate.prepare_ext3(path, fd, overlay, writable=writable, kernel=(mode == "kernel"), uid=uid,
                                      gid=gid)
            # no layer (an image that is all overlay): the stub is the one lower layer overlayfs needs
            stub = jobview.make_stub(directory, mountpoints, io=io) if mountpoints or not layers else None
            build = _assemble_fuse if mode == "fuse" else _assemble_kernel
            build(current, base_dir, directory, fd, layers, overlay, hold_fds, io, stub, copyup_child)
        except BaseException:
            teardown(job, base_dir=base_dir, io=io)
            raise
    finally:
        os.close(fd)
    log.info("assembled %s for job %s (%s, %s)", path, job, mode, "rw" if writable else "ro")
    return Rootfs(job, os.path.join(directory, "rootfs"), os.path.abspath(os.fspath(base_dir)), path, mode,
                  writable, uid, gid)


def teardown(job_id: str, *, base_dir: str | os.PathLike[str], timeout: float = mounts.EXIT_TIMEOUT,
             io: FileIO = REAL_IO) -> TeardownReport:
    """Undo `assemble` for `job_id`, in reverse order, whatever state it was left in
    (crash mid-setup included). Idempotent: a job with nothing left is a no-op."""
    job = state.check_job_id(job_id)
    directory = state.job_dir(base_dir, job)
    if not os.path.isdir(directory):
        return TeardownReport(job, (), (), True)
    try:
        recorded = state.load(base_dir, job)
    except state.StateError as exc:
        log.error("%s; tearing down by scanning mountinfo", exc)
        recorded = None
    unmounted: list[str] = []
    signalled: list[int] = []
    for step in reversed(recorded.steps if recorded else ()):
        if mounts.is_mounted(step.target):
            mounts.unmount(step.target)
            unmounted.append(step.target)
        if step.kind == "fuse" and mounts.stop_process(step.pid, step.pid_start, grace=timeout):
            signalled.append(step.pid or 0)
        if step.kind == "kernel" and step.loop and recorded is not None:
            device, _, offset = step.loop.partition("@")  # autoclear normally detached it already
            if offset.isdigit():
                mounts.detach_loop(device, (recorded.image_dev, recorded.image_ino), int(offset))
    for target in mounts.mounts_under(directory):  # anything the record does not know about
        mounts.unmount(target)
        unmounted.append(target)
    left = mounts.mounts_under(directory)
    if left:
        raise ExternalToolError(directory, f"still mounted after teardown: {', '.join(left)}", tool="umount",
                                returncode=1, output_tail="")
    for name in ("scratch", jobview.STUB_DIR, jobview.VIEW_DIR):
        _empty_scratch(os.path.join(directory, name), io)
    removed = _remove_job_dir(directory, io)
    log.info("tore down job %s: %d unmounted, %d daemons signalled", job, len(unmounted), len(signalled))
    return TeardownReport(job, tuple(unmounted), tuple(signalled), removed)


def find_leftovers(base_dir: str | os.PathLike[str]) -> list[str]:
    """Job ids with a runtime directory under base_dir (assembled or left by a crash)."""
    return state.job_ids(base_dir)


# --- building -------------------------------------------------------------------------------------
def _make_job_dir(base_dir: str | os.PathLike[str], directory: str, io: FileIO) -> None:
    io.makedirs(os.fspath(base_dir), 0o755)
    try:
        io.mkdir(directory, 0o755)
    except FileExistsError:
        raise UsageError(directory, "already exists: the job is assembled or was left over by a crash "
                                    "(tear it down first)") from None
    io.mkdir(os.path.join(directory, "log"), 0o700)


def _mountpoint(directory: str, name: str, owner: tuple[int, int] | None, io: FileIO) -> str:
    target = os.path.join(directory, name)
    io.mkdir(target, 0o700 if owner else 0o755)
    if owner:
        os.chown(target, *owner)  # fusermount wants the user to own the mount point
    return target


def _record(base_dir: str | os.PathLike[str], current: JobState, step: Step, io: FileIO) -> JobState:
    updated = current.with_step(step)
    state.save(base_dir, updated, io=io)
    return updated


_WHAT = {"ext3": "the ext3 overlay", "rootfs": "the overlay rootfs"}


def _fuse_step(current: JobState, base_dir: str | os.PathLike[str], step: Step, argv: list[str], *,
               fds: Sequence[int], io: FileIO, umask: int = 0o022) -> JobState:
    current = _record(base_dir, current, step, io)
    log_path = os.path.join(os.path.dirname(step.target), "log", f"{step.name}.log")
    what = _WHAT.get(step.name, f"squashfs {step.name.replace('.', ' ')}")
    proc = mounts.spawn_fuse(argv, step.target, uid=current.uid, gid=current.gid, pass_fds=fds,
                             log_path=log_path, umask=umask, image=current.image, what=what, io=io)
    return _record(base_dir, current, replace(step, status="mounted", pid=proc.pid,
                                              pid_start=process_start_ticks(proc.pid)), io)


def _fuse_steps(current: JobState, base_dir: str | os.PathLike[str],
                daemons: Sequence[tuple[Step, list[str], tuple[int, ...], int]], *, io: FileIO) -> JobState:
    """`_fuse_step` for independent mounts: every daemon started (and recorded with its pid)
    before the first wait."""
    started = []
    for step, argv, fds, umask in daemons:
        current = _record(base_dir, current, step, io)
        log_path = os.path.join(os.path.dirname(step.target), "log", f"{step.name}.log")
        proc = mounts.start_fuse(argv, uid=current.uid, gid=current.gid, pass_fds=fds, log_path=log_path,
                                 umask=umask, io=io)
        step = replace(step, pid=proc.pid, pid_start=process_start_ticks(proc.pid))
        current = _record(base_dir, current, step, io)
        started.append((step, proc, log_path))
    for step, proc, log_path in started:
        what = _WHAT.get(step.name, f"squashfs {step.name.replace('.', ' ')}")
        mounts.wait_mounted(proc, step.target, log_path=log_path, image=current.image, what=what)
        current = _record(base_dir, current, replace(step, status="mounted"), io)
    return current


def _opt_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


def _assemble_fuse(current: JobState, base_dir: str | os.PathLike[str], directory: str, fd: int,
                   layers: list[Region], overlay: Region | None, hold_fds: Sequence[int], io: FileIO,
                   stub: str | None = None, copyup_child: UserChild | None = None) -> None:
    owner = (current.uid, current.gid)
    source = f"/proc/self/fd/{fd}"
    # allow_other lets root enter the job user's mounts; an unprivileged exec enters them
    # as that same user (and fusermount3 would refuse it without user_allow_other)
    other = ",allow_other" if os.geteuid() == 0 else ""
    lowers: list[str] = []
    # The layers and the ext3 are independent mounts: their daemons start together and are
    # waited for one by one (each is recorded with its pid before any wait, for teardown).
    daemons: list[tuple[Step, list[str], tuple[int, ...], int]] = []
    for number, layer in enumerate(layers):
        target = _mountpoint(directory, f"layer.{number}", owner, io)
        opts = f"ro,offset={layer.offset}{other},subtype=squashfuse,fsname={_opt_escape(current.image)}"
        daemons.append((Step("fuse", f"layer.{number}", target), ["squashfuse", "-f", "-o", opts, source, target],
                        (fd,), 0o022))
        lowers.insert(0, target)  # overlay lowerdir lists the top layer first
    if stub is not None:
        lowers.append(stub)  # lowest: the image's own files win over the mount points
    if overlay is not None:
        target = _mountpoint(directory, "ext3", owner, io)
        opts = f"offset={overlay.offset},fakeroot{other}" + ("" if current.writable else ",ro")
        daemons.append((Step("fuse", "ext3", target), ["fuse2fs", "-f", source, target, "-o", opts],
                        (fd, *hold_fds), 0))
    current = _fuse_steps(current, base_dir, daemons, io=io)
    current, upper, work = _upper_dirs(current, base_dir, directory, overlay, lowers, io)
    if current.writable:
        from .copyup import prepare_upper

        prepare_upper(upper, lowers, uid=current.uid, gid=current.gid, io=io, child=copyup_child)  # as the job user
    target = _mountpoint(directory, "rootfs", owner, io)
    opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}{other}"
    if not current.writable and current.uid != 0:
        # The tmpfs upper is a real filesystem: an unprivileged daemon cannot chown copied-up
        # root-owned directories there; keep the ownership in xattrs instead (tmpfs has user.*).
        opts += ",xattr_permissions=2"
    _fuse_step(current, base_dir, Step("fuse", "rootfs", target), ["fuse-overlayfs", "-f", "-o", opts, target],
               fds=(), io=io, umask=0)


def _assemble_kernel(current: JobState, base_dir: str | os.PathLike[str], directory: str, fd: int,
                     layers: list[Region], overlay: Region | None, hold_fds: Sequence[int], io: FileIO,
                     stub: str | None = None, copyup_child: UserChild | None = None) -> None:
    lowers: list[str] = []
    for number, layer in enumerate(layers):
        target = _mountpoint(directory, f"layer.{number}", None, io)
        current = _kernel_step(current, base_dir, f"layer.{number}", target, fd, layer, readonly=True,
                               fstype="squashfs", options="ro,nosuid,nodev", io=io)
        lowers.insert(0, target)
    if stub is not None:
        lowers.append(stub)
    if overlay is not None:
        target = _mountpoint(directory, "ext3", None, io)
        options = "rw,nosuid,nodev" if current.writable else "ro,noload,nosuid,nodev"
        current = _kernel_step(current, base_dir, "ext3", target, fd, overlay, readonly=not current.writable,
                               fstype="ext3", options=options, io=io)
    current, upper, work = _upper_dirs(current, base_dir, directory, overlay, lowers, io)
    target = _mountpoint(directory, "rootfs", None, io)
    current = _record(base_dir, current, Step("kernel", "rootfs", target), io)
    mounts.kernel_mount("overlay", target, "overlay",
                        f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},nosuid,nodev")
    _record(base_dir, current, Step("kernel", "rootfs", target, status="mounted"), io)


def _kernel_step(current: JobState, base_dir: str | os.PathLike[str], name: str, target: str, fd: int,
                 region: Region, *, readonly: bool, fstype: str, options: str, io: FileIO) -> JobState:
    current = _record(base_dir, current, Step("kernel", name, target), io)
    with mounts.loop_from_fd(fd, region.offset, region.size, readonly=readonly, label=f"sifoverlay:{name}") as dev:
        current = _record(base_dir, current, Step("kernel", name, target, loop=f"{dev}@{region.offset}"), io)
        mounts.kernel_mount(dev, target, fstype, options)
    return _record(base_dir, current, Step("kernel", name, target, status="mounted", loop=f"{dev}@{region.offset}"), io)


def _upper_dirs(current: JobState, base_dir: str | os.PathLike[str], directory: str, overlay: Region | None,
                lowers: list[str], io: FileIO) -> tuple[JobState, str, str]:
    """rw: the ext3's upper/ and work/; ro: a private tmpfs (changes discarded), with the
    ext3's upper/ (if any) as the topmost lower layer."""
    ext3 = os.path.join(directory, "ext3")
    if current.writable:
        upper, work = os.path.join(ext3, "upper"), os.path.join(ext3, "work")
        for sub, mode in ((upper, 0o755), (work, 0o700)):
            _ensure_real_dir(current, sub, mode, io)
        return current, upper, work
    if overlay is not None:
        _ensure_real_dir(current, os.path.join(ext3, "upper"), 0o755, io, create=False)
        lowers.insert(0, os.path.join(ext3, "upper"))
    scratch = _mountpoint(directory, "scratch", None, io)
    if os.geteuid() == 0:
        current = _record(base_dir, current, Step("tmpfs", "scratch", scratch), io)
        mounts.kernel_mount("tmpfs", scratch, "tmpfs", f"mode=0700,uid={current.uid},gid={current.gid},nosuid,nodev")
        current = _record(base_dir, current, Step("tmpfs", "scratch", scratch, status="mounted"), io)
    # (unprivileged: a plain directory of ours, emptied at teardown)
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    for sub in (upper, work):
        io.mkdir(sub, 0o755)
        if os.geteuid() == 0:
            os.chown(sub, current.uid, current.gid)
    if current.mode == "fuse" and current.uid != 0:
        # The user must own the upper to write it; show the image's own root instead
        # (fuse-overlayfs xattr_permissions=2 reads ownership and mode from this xattr).
        top = os.stat(lowers[0])
        value = f"{top.st_uid}:{top.st_gid}:{stat.S_IMODE(top.st_mode):o}".encode()
        for key in ("user.fuseoverlayfs.override_stat", "user.containers.override_stat"):
            os.setxattr(upper, key, value)
    return current, upper, work


def _ensure_real_dir(current: JobState, path: str, mode: int, io: FileIO, *, create: bool = True) -> None:
    """upper/ and work/ must be directories of the ext3 itself: a symlink there would make
    a kernel overlay write outside the image."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise OverlayStateError(current.image, f"ext3 overlay has no {os.path.basename(path)}/ directory") from None
        io.mkdir(path, mode)  # SingularityCE creates missing upper/ and work/ the same way
        if current.mode == "kernel":
            os.chown(path, current.uid, current.gid)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise OverlayStateError(current.image, f"ext3 overlay's {os.path.basename(path)} is not a directory")


def _empty_scratch(scratch: str, io: FileIO) -> None:
    """An unprivileged ro run's upper and work dirs are a plain directory (no tmpfs): empty
    it, bottom-up, never following a symlink or entering another filesystem."""
    try:
        top = os.lstat(scratch)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode) or mounts.is_mounted(scratch):
        return
    for root, dirs, files in os.walk(scratch, topdown=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            io.unlink(os.path.join(root, name))
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path) and os.lstat(path).st_dev == top.st_dev:
                try:
                    io.rmdir(path)
                except OSError as exc:
                    log.error("cannot remove %s: %s", path, exc.strerror)


def _remove_job_dir(directory: str, io: FileIO) -> bool:
    """Remove the job directory without ever recursing through a mount: only the known
    layout is removed, mount points only when empty."""
    log_dir = os.path.join(directory, "log")
    if os.path.isdir(log_dir) and not os.path.islink(log_dir):
        for name in os.listdir(log_dir):
            io.unlink(os.path.join(log_dir, name))
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name == state.STATE_FILE:
            continue
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                io.rmdir(path)
            else:
                io.unlink(path)
        except OSError as exc:
            log.error("cannot remove %s: %s (left in place)", path, exc.strerror)
            return False
    state_path = os.path.join(directory, state.STATE_FILE)
    if os.path.exists(state_path):
        io.unlink(state_path)
    io.rmdir(directory)
    return True


__all__ = ["MODES", "Rootfs", "TeardownReport", "assemble", "find_leftovers", "teardown"]
