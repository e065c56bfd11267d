"""The job's environment and working directory inside the image - the rules, once, for
both front ends (slurm_plugin/src/taskenv.c applies the same rules to a Slurm task; the
tests check both against the same expectations; docs/slurm.md writes them down).

Environment, in order (a later step wins):

1. the job's environment (Slurm: the task's; exec: the caller's), or with ``cleanenv``
   only the names in `CLEANENV_KEEP`, those starting with `CLEANENV_PREFIXES` and those
   listed bare in ``--oci-sif-env NAME``;
2. ``HOME``, ``USER`` and ``LOGNAME`` of the job user (exec under sudo leaked root's);
3. the image's config ``Env``: each NAME=VALUE replaces the job's value (pyxis: the
   image's ENV wins), except the NAMEs the user listed bare in ``--oci-sif-env NAME``
   (pyxis ``--container-env``), whose job value is kept;
4. ``PATH``: if neither the image nor step 1 set one, `DEFAULT_PATH`; as root for another
   user (sudo exec) the caller's PATH is never kept as is (step 1 drops it);
5. additions of the runtime (GPU: the driver's bin/lib directories appended to PATH and
   LD_LIBRARY_PATH);
6. ``--oci-sif-env NAME=VALUE`` / exec ``--env NAME=VALUE``: set last, always win.

Working directory: the one asked for (``--oci-sif-workdir``, exec ``--pwd``) must exist
inside (else the task fails); by default the submit directory (exec: the current
directory) when it exists inside, else the image's ``WorkingDir``, else ``/``, with one
warning line on stderr when it falls back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sifoverlay.errors import UsageError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLEANENV_KEEP = ("HOME", "USER", "LOGNAME", "TERM", "LANG", "LANGUAGE", "LC_ALL", "TZ", "TMPDIR",
                 "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
CLEANENV_PREFIXES = ("LC_", "SLURM_", "SLURMD_", "PMI_", "PMIX_", "OMPI_", "MPIR_")


@dataclass(frozen=True, slots=True)
class EnvOptions:
    """--oci-sif-env / exec --env: NAME=VALUE settings and bare NAMEs to keep."""

    set: tuple[tuple[str, str], ...] = ()
    keep: tuple[str, ...] = ()
    clean: bool = False

    @classmethod
    def parse(cls, items: Iterable[str], *, clean: bool = False, what: str = "--env") -> EnvOptions:
        settings: list[tuple[str, str]] = []
        keep: list[str] = []
        for item in items:
            name, eq, value = item.partition("=")
            if not valid_name(name):
                raise UsageError(None, f"bad {what} {item!r}: expected NAME=VALUE or NAME")
            if eq:
                settings.append((name, value))
            else:
                keep.append(name)
        return cls(tuple(settings), tuple(keep), clean)


def valid_name(name: str) -> bool:
    return bool(name) and not name[0].isdigit() and all(c.isalnum() or c == "_" for c in name) and name.isascii()


def image_env(entries: Sequence[str]) -> list[tuple[str, str]]:
    """The OCI config's ``Env`` (NAME=VALUE strings) as pairs; malformed ones dropped."""
    out = []
    for entry in entries:
        if isinstance(entry, str) and "=" in entry and valid_name(entry.partition("=")[0]):
            name, _, value = entry.partition("=")
            out.append((name, value))
    return out


def compose(job_env: Mapping[str, str], image: Sequence[tuple[str, str]], options: EnvOptions, *,
            user: str, home: str, drop_path: bool = False,
            append: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """Steps 1-6 of the module docstring."""
    if options.clean:
        env = {k: v for k, v in job_env.items()
               if k in CLEANENV_KEEP or k.startswith(CLEANENV_PREFIXES) or k in options.keep}
    else:
        env = dict(job_env)
    if drop_path:
        env.pop("PATH", None)
    env.update(HOME=home, USER=user, LOGNAME=user)
    for name, value in image:
        if name in options.keep and name in job_env:
            continue
        env[name] = value
    env.setdefault("PATH", DEFAULT_PATH)
    for name, value in append:
        env[name] = f"{env[name]}:{value}" if env.get(name) else value
    env.update(options.set)
    return env


def workdir_candidates(requested: str | None, current: str | None, image_workdir: str | None) -> tuple[str, ...]:
    """Directories to try in order; the first is the wanted one (a fallback warns)."""
    if requested:
        return (requested,)
    found = [d for d in (current, image_workdir or "/", "/") if d and d.startswith("/")]
    return tuple(dict.fromkeys(found))


__all__ = ["CLEANENV_KEEP", "CLEANENV_PREFIXES", "DEFAULT_PATH", "EnvOptions", "compose", "image_env",
           "valid_name", "workdir_candidates"]
