"""Power-loss simulator for crash tests: judge which recorded operations were durable and
replay an op log onto a copy of the files.

It works on the log of a `sifoverlay.fsio.CountingIO(keep_log=True, name_fds=True)` run:
a write, truncate or hole punch survives a power cut only if a later `fsync` of the same
file follows it; a create, rename, link, unlink or mkdir only if a later `fsync_dir` of
its parent does (crash-safety.md R12). `replay_op` deliberately bypasses the I/O seam: it
rebuilds the on-disk state a power cut would have left, so it must not be counted.
"""

from __future__ import annotations

import os

Op = tuple[str, dict[str, object]]

_DATA_OPS = ("pwrite", "truncate", "punch_hole")
_NAME_OPS = ("open", "unlink", "mkdir", "rename", "link")


def durable_flags(ops: list[Op]) -> list[bool]:
    """For each op, whether it would survive a power cut at the end of `ops`."""
    out = []
    for i, (op, info) in enumerate(ops):
        later = ops[i + 1 :]
        if op in _DATA_OPS:
            path = info.get("path")
            out.append(any(o == "fsync" and inf.get("path") == path for o, inf in later))
        elif op in _NAME_OPS:
            parent = os.path.dirname(str(info.get("dst") or info.get("path")))
            out.append(any(o == "fsync_dir" and inf.get("path") == parent for o, inf in later))
        else:
            out.append(True)
    return out


def replay_op(op: str, info: dict[str, object], *, torn: bool = False) -> None:
    """Apply one logged op to the files on disk; `torn` writes only the first half of a pwrite.
    Ops whose file no longer exists (its creation was lost) are skipped."""
    path = info.get("path")
    if isinstance(path, str) and path.endswith(" (deleted)"):
        return
    if op == "open":
        flags = int(info["flags"])  # type: ignore[call-overload]
        if flags & os.O_CREAT and not os.path.exists(str(path)):
            mode = int(info.get("mode", 0o644))  # type: ignore[call-overload]
            os.close(os.open(str(path), os.O_WRONLY | os.O_CREAT, mode))  # io-seam: exempt (power-loss replay)
        elif flags & os.O_TRUNC and os.path.exists(str(path)):
            os.truncate(str(path), 0)  # io-seam: exempt (power-loss replay)
    elif op in _DATA_OPS:
        if not isinstance(path, str) or not os.path.exists(path):
            return
        fd = os.open(path, os.O_WRONLY)  # io-seam: exempt (power-loss replay)
        try:
            if op == "pwrite":
                data = bytes(info["data"])  # type: ignore[call-overload]
                offset = int(info["offset"])  # type: ignore[call-overload]
                os.pwrite(fd, data[: len(data) // 2] if torn else data, offset)  # io-seam: exempt (power-loss replay)
            elif op == "truncate":
                os.ftruncate(fd, int(info["length"]))  # type: ignore[call-overload]  # io-seam: exempt (power-loss replay)
            else:
                offset, length = int(info["offset"]), int(info["length"])  # type: ignore[call-overload]
                os.pwrite(fd, bytes(length), offset)  # io-seam: exempt (power-loss replay)
        finally:
            os.close(fd)
    elif op == "rename":
        if os.path.exists(str(info["src"])):
            os.rename(str(info["src"]), str(info["dst"]))  # io-seam: exempt (power-loss replay)
    elif op == "link":
        if os.path.exists(str(info["src"])) and not os.path.exists(str(info["dst"])):
            os.link(str(info["src"]), str(info["dst"]))  # io-seam: exempt (power-loss replay)
    elif op == "unlink":
        if os.path.exists(str(path)):
            os.unlink(str(path))  # io-seam: exempt (power-loss replay)
    elif op == "mkdir":
        if not os.path.exists(str(path)):
            os.mkdir(str(path), int(info.get("mode", 0o755)))  # type: ignore[call-overload]  # io-seam: exempt (power-loss replay)


def open_fds() -> set[int]:
    """This process's open fds (without the one listdir used for /proc/self/fd itself)."""
    out = set()
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            os.fstat(fd)
        except OSError:
            continue
        out.add(fd)
    return out
