"""The one error tree of sifoverlay.

Every error carries its data as attributes and renders as ONE line that names the
image (or file) and the problem. Only the CLI maps classes to exit codes; the Epilog,
the operator and the exporter catch `SifOverlayError` and record it.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any, Final

# sysexits-style codes, mapped once in the CLI.
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_TEMPFAIL = 75  # busy image: try again later
EXIT_NOPERM = 77


class SifOverlayError(Exception):
    """Base class. `path` is the image or file concerned (may be None)."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, path: str | os.PathLike[str] | None, problem: str, **data: Any) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.problem = problem
        self.data = data
        for key, value in data.items():
            setattr(self, key, value)
        super().__init__(self.message())

    def message(self) -> str:
        text = " ".join(self.problem.split())  # always one line
        return f"{self.path}: {text}" if self.path else text

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": type(self).__name__, "path": self.path, "message": self.message()}
        for key, value in self.data.items():
            out[key] = value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)
        return out


# --- bad input (exit 2): the file is not what it should be -------------------------
class BadInput(SifOverlayError):
    exit_code = EXIT_BAD_INPUT


class SifFormatError(BadInput):
    """The SIF container itself is malformed (header, descriptor table, offsets)."""


class NotAnOciSif(BadInput):
    """A valid SIF, but not an OCI-SIF (no root index) or no single image in it."""


class OciFormatError(BadInput):
    """OCI JSON inside an OCI-SIF is invalid, or a digest does not resolve / match."""


class Ext3FormatError(BadInput):
    """The overlay region is not an acceptable ext3 filesystem."""


class OverlayStateError(BadInput):
    """The operation does not fit the image: no overlay, already has one, signed image..."""


class CapacityError(BadInput):
    """Not enough free descriptor slots; `needed` and `free` say how many."""

    needed: int
    free: int


class UsageError(BadInput):
    """Bad arguments or configuration (relative path, unknown key...)."""


class FileProblem(BadInput):
    """A path given cannot be used as it is: missing, not a directory, a loop (OSError)."""


# --- state (exit 75 / 77 / 1) -------------------------------------------------------
class ImageBusy(SifOverlayError):
    """A live writer holds the image (lease or mount); `holder` describes it."""

    exit_code = EXIT_TEMPFAIL


class NotAuthorized(SifOverlayError):
    """The job's user may not write the image, or it lies outside the allowed roots."""

    exit_code = EXIT_NOPERM


class JournalError(SifOverlayError):
    """A journal record could not be written, or recovery could not finish."""


class RecoveryNeeded(SifOverlayError):
    """The image has an unfinished journal entry that this caller may not recover."""

    exit_code = EXIT_TEMPFAIL


class ExternalToolError(SifOverlayError):
    """An external tool (e2fsck, mksquashfs, fuse2fs...) failed.

    Attributes: tool, returncode, output_tail (last lines of its output).
    """

    # Set from **data by SifOverlayError.__init__; declared so callers type-check.
    tool: str
    returncode: int | None  # None when the tool never ran
    output_tail: str


class RegistryError(SifOverlayError):
    """A registry push/pull failed (auth, unreachable, digest mismatch)."""


class IOFailure(SifOverlayError):
    """Reading or writing a file failed for a reason other than permissions or a bad path
    (disk full, I/O error...): an OSError in the error tree."""


# errno values that mean "you may not" (exit 77) and "that path is not usable" (exit 2).
PERMISSION_ERRNOS: Final = frozenset({_errno.EACCES, _errno.EPERM, _errno.EROFS})
PATH_ERRNOS: Final = frozenset({_errno.ENOENT, _errno.ENOTDIR, _errno.EISDIR, _errno.ELOOP, _errno.ENAMETOOLONG,
                                _errno.EEXIST, _errno.ENXIO, _errno.ENODEV})


def from_os_error(exc: OSError, path: str | os.PathLike[str] | None, problem: str | None = None) -> SifOverlayError:
    """The error tree's form of an OSError about `path`: NotAuthorized (exit 77) for a
    permission problem, FileProblem (exit 2) for a bad path, IOFailure (exit 1) else.
    `problem` defaults to the system's text; errno is kept as data."""
    code = exc.errno
    text = problem if problem is not None else (exc.strerror or str(exc))
    if code in PERMISSION_ERRNOS:
        return NotAuthorized(path, text, errno=code)
    if code in PATH_ERRNOS:
        return FileProblem(path, text, errno=code)
    return IOFailure(path, text, errno=code)
