"""The job's view of the host inside the image: identity files, network files, $HOME and
the binds - one plan for both front ends (`sifoverlay exec` and the Slurm Prolog).

Nothing here writes into the image's overlay. Two pieces live in the job's runtime
directory instead (root-owned, removed at teardown):

* ``stub/``: an extra, lowest lower layer of the job's overlayfs holding an empty file or
  directory for every bind destination (and /etc/passwd, /etc/group, /etc/hosts,
  /etc/resolv.conf). It is at the BOTTOM of the stack, so whatever the image has at that
  path wins and the stub only supplies a mount point where the image has none. A mount
  point is not a write: the overlay's upper never sees it.
* ``view/``: the per-job ``passwd`` and ``group`` (the image's own entries, read as the
  job user, plus the job user's entries and groups from the host), bound read-only over
  the image's files. /etc/hosts and /etc/resolv.conf are the host's own files, bound
  read-only.

The plan is a list of `Bind`; `enter` (exec) and slurm_plugin/src/rootfs.c (Slurm tasks)
mount them, in order, after /proc, /dev and /sys.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sifoverlay.errors import UsageError
from sifoverlay.fsio import REAL_IO, FileIO

log = logging.getLogger(__name__)

HOST_FILES = ("/etc/hosts", "/etc/resolv.conf")
IDENTITY_FILES = ("/etc/passwd", "/etc/group")
MAX_IDENTITY_FILE = 4 << 20  # the image's passwd/group: bigger ones are not read
READ_TIMEOUT = 20.0
STUB_DIR = "stub"
VIEW_DIR = "view"


@dataclass(frozen=True, slots=True)
class Bind:
    """One bind mount of the job's view. `system`: the source was made or chosen by root
    (view files, host files, driver files) rather than named by the user."""

    source: str  # host path (absolute)
    dest: str  # path inside the image (absolute)
    readonly: bool = False
    system: bool = False
    is_dir: bool = True

    @classmethod
    def parse(cls, spec: str, *, what: str = "--bind", cwd: str | None = None) -> Bind:
        """SRC[:DST[:ro|rw]] (pyxis --container-mounts, SingularityCE --bind); a relative SRC
        is taken from `cwd` when given. The source is not looked at here: `check_sources`
        does that as the job user."""
        parts = spec.split(":")
        if cwd is not None and parts[0] and not parts[0].startswith("/"):
            parts[0] = os.path.join(cwd, parts[0])
        if not 1 <= len(parts) <= 3 or not parts[0]:
            raise UsageError(None, f"bad {what} {spec!r}: expected SRC[:DST[:ro|rw]]")
        if len(parts) == 2 and parts[1] in ("ro", "rw"):  # SRC:ro - the flag, same path inside
            parts = [parts[0], "", parts[1]]
        flag = parts[2] if len(parts) > 2 else "rw"
        dest = parts[1] if len(parts) > 1 and parts[1] else parts[0]
        if flag not in ("ro", "rw"):
            raise UsageError(None, f"bad {what} {spec!r}: the flag must be ro or rw, not {flag!r}")
        if not parts[0].startswith("/") or not dest.startswith("/"):
            raise UsageError(None, f"bad {what} {spec!r}: SRC and DST must be absolute paths")
        for path in (parts[0], dest):
            if any(c in path for c in "\t\n\0") or ".." in path.split("/"):
                raise UsageError(None, f"bad {what} {spec!r}: no '..', tab or newline in paths")
        return cls(os.path.normpath(parts[0]), os.path.normpath(dest), flag == "ro")


def parse_binds(value: str, *, what: str, cwd: str | None = None) -> list[Bind]:
    """A comma-separated list of SRC[:DST[:ro|rw]] (empty items ignored)."""
    return [Bind.parse(item.strip(), what=what, cwd=cwd) for item in value.split(",") if item.strip()]


@dataclass(frozen=True, slots=True)
class Identity:
    """The job user as the host knows it."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str
    gecos: str
    groups: tuple[tuple[str, int], ...]  # (name, gid), primary group first

    @classmethod
    def lookup(cls, uid: int, gid: int, groups: Iterable[int] = ()) -> Identity:
        try:
            entry = pwd.getpwuid(uid)
            name, home, shell, gecos = entry.pw_name, entry.pw_dir, entry.pw_shell, entry.pw_gecos
            gids = [gid, *sorted(set(os.getgrouplist(name, gid)) | set(groups))]
        except KeyError:  # an id without a passwd entry (k8s UID:GID): a made-up name
            name, home, shell, gecos = f"uid{uid}", "/", "/bin/sh", ""
            gids = [gid, *sorted(set(groups))]
        seen: list[tuple[str, int]] = []
        for g in gids:
            if any(g == have for _, have in seen):
                continue
            try:
                seen.append((grp.getgrgid(g).gr_name, g))
            except KeyError:
                seen.append((f"gid{g}", g))
        return cls(name, uid, gid, home or "/", shell or "/bin/sh", gecos, tuple(seen))


@dataclass(frozen=True, slots=True)
class ViewRequest:
    """What the job asked for (options) and what the site allows (plugstack/admin)."""

    binds: tuple[Bind, ...] = ()  # user binds (--oci-sif-mounts, exec --bind)
    site_binds: tuple[Bind, ...] = ()  # plugstack binds=
    home: bool = True  # bind $HOME (no: --oci-sif-no-home / exec --no-home / plugstack home=no)
    host_files: bool = True  # /etc/hosts, /etc/resolv.conf, passwd/group entries
    extra: tuple[Bind, ...] = field(default=())  # system binds (GPU driver files)


def check_sources(binds: Sequence[Bind], uid: int, gid: int) -> list[Bind]:
    """The binds with `is_dir` filled in, after checking every user-named source is a
    directory or regular file readable BY THE JOB USER (as root, in a child with her uid, gid and groups, no
    capabilities). One clear UsageError naming the first that is not."""
    user = [b for b in binds if not b.system]
    if not user:
        return list(binds)
    kinds = _probe_as_user([b.source for b in user], uid, gid)
    out: list[Bind] = []
    for bind in binds:
        if bind.system:
            out.append(bind)
            continue
        kind = kinds.get(bind.source, "missing")
        if kind == "missing":
            raise UsageError(bind.source, f"bind source does not exist or is not readable by uid {uid}")
        out.append(Bind(bind.source, bind.dest, bind.readonly, False, kind == "d"))
    return out


# readable, not just reachable (a bind of a directory she may not list would show her nothing
# she could not see anyway, but it is refused all the same, as slurm_plugin/src/rootfs.c does)
_PROBE = ('for p; do if [ -d "$p" ] && [ -r "$p" ]; then echo "d $p"; elif [ -f "$p" ] && [ -r "$p" ]; '
          'then echo "f $p"; else echo "missing $p"; fi; done')


def _probe_as_user(paths: Sequence[str], uid: int, gid: int) -> dict[str, str]:
    argv = ["sh", "-c", _PROBE, "sh", *paths]
    if os.geteuid() == 0 and uid != 0:
        argv = [*as_user_argv(uid, gid), *argv]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=READ_TIMEOUT,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}, cwd="/", check=False)
    found: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        kind, _, path = line.partition(" ")
        found[path] = kind
    return found


def as_user_argv(uid: int, gid: int) -> list[str]:
    """setpriv prefix: the user's uid, gid and supplementary groups, no capabilities."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"]


def plan(request: ViewRequest, identity: Identity, view_dir: str) -> list[Bind]:
    """Every bind of the job's view, in mount order (later ones may sit on earlier ones):
    identity files, host network files, $HOME, site binds, user binds, system extras."""
    binds: list[Bind] = []
    if request.host_files:
        binds += [Bind(os.path.join(view_dir, os.path.basename(f)), f, True, True, False) for f in IDENTITY_FILES]
        binds += [Bind(f, f, True, True, False) for f in HOST_FILES if os.path.exists(f)]
    if request.home and identity.home not in ("", "/") and os.path.isdir(identity.home):
        binds.append(Bind(identity.home, identity.home, False, False, True))
    binds += [*request.site_binds, *request.binds, *request.extra]
    return binds


def mountpoints(binds: Sequence[Bind]) -> list[tuple[str, bool]]:
    """(destination, is_dir) for the stub layer."""
    return [(b.dest, b.is_dir) for b in binds]


def make_stub(directory: str, points: Sequence[tuple[str, bool]], *, io: FileIO = REAL_IO) -> str:
    """``directory/stub``: an empty directory or file at every mount point (parents 0755).
    Returns its path (the lowest lower layer of the job's overlay)."""
    stub = os.path.join(directory, STUB_DIR)
    io.mkdir(stub, 0o755)
    for dest, is_dir in points:
        rel = os.path.normpath(dest).lstrip("/")
        if not rel:
            continue
        parent = stub
        for part in rel.split("/")[:-1]:
            parent = os.path.join(parent, part)
            if not os.path.isdir(parent):
                io.mkdir(parent, 0o755)
        target = os.path.join(stub, rel)
        if os.path.lexists(target):
            continue
        if is_dir:
            io.mkdir(target, 0o755)
        else:
            io.close(io.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    return stub


def write_identity(directory: str, rootfs: str, identity: Identity, *, io: FileIO = REAL_IO) -> str:
    """``directory/view/{passwd,group}``: the image's entries (read as the job user) with
    the job user's own passwd entry and groups from the host. Returns the view dir."""
    view = os.path.join(directory, VIEW_DIR)
    if not os.path.isdir(view):
        io.mkdir(view, 0o755)
    passwd = merge_passwd(read_image_file(rootfs, "etc/passwd", identity), identity)
    group = merge_group(read_image_file(rootfs, "etc/group", identity), identity)
    io.write_file_atomic(os.path.join(view, "passwd"), passwd.encode(), mode=0o644)
    io.write_file_atomic(os.path.join(view, "group"), group.encode(), mode=0o644)
    return view


def read_image_file(rootfs: str, rel: str, identity: Identity) -> str:
    """A small text file of the image, read AS THE JOB USER (the tree is hers: a FIFO or a
    symlink to a host file gets her rights, not root's, and a hang only a timeout).
    Missing or unreadable: empty."""
    path = os.path.join(rootfs, rel)
    argv = ["head", "-c", str(MAX_IDENTITY_FILE), "--", path]
    if os.geteuid() == 0 and identity.uid != 0:
        from sifoverlay.ext3.tools import unprivileged_argv

        argv = [*unprivileged_argv(identity.uid, identity.gid), *argv]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=READ_TIMEOUT, cwd="/",
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}, check=False)
    except subprocess.TimeoutExpired:
        log.warning("reading /%s of the image timed out: using the host entries only", rel)
        return ""
    return proc.stdout.decode(errors="replace") if proc.returncode == 0 else ""


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def merge_passwd(image_text: str, identity: Identity) -> str:
    """The image's passwd minus any entry with the user's name or uid, plus hers."""
    keep = []
    for line in _lines(image_text):
        fields = line.split(":")
        if fields[0] == identity.name or (len(fields) > 2 and fields[2] == str(identity.uid)):
            continue
        keep.append(line)
    if not any(line.split(":")[0] == "root" for line in keep) and identity.uid != 0:
        keep.insert(0, "root:x:0:0:root:/root:/bin/sh")
    gecos = identity.gecos.replace(":", " ").replace("\n", " ")
    keep.append(f"{identity.name}:x:{identity.uid}:{identity.gid}:{gecos}:{identity.home}:{identity.shell}")
    return "\n".join(keep) + "\n"


def merge_group(image_text: str, identity: Identity) -> str:
    """The image's group minus entries that clash with the user's groups (by name or gid),
    plus each of her groups, her name listed as a member of the supplementary ones."""
    names = {name for name, _ in identity.groups}
    gids = {str(g) for _, g in identity.groups}
    keep = [line for line in _lines(image_text)
            if line.split(":")[0] not in names and (len(line.split(":")) < 3 or line.split(":")[2] not in gids)]
    for number, (name, gid) in enumerate(identity.groups):
        keep.append(f"{name}:x:{gid}:" + ("" if number == 0 else identity.name))
    return "\n".join(keep) + "\n"


__all__ = ["HOST_FILES", "IDENTITY_FILES", "Bind", "Identity", "ViewRequest", "as_user_argv", "check_sources",
           "make_stub", "merge_group", "merge_passwd", "mountpoints", "parse_binds", "plan", "read_image_file",
           "write_identity"]
