"""The job view of a Slurm job (issue 14), planned by the Prolog with the same runtime
code `sifoverlay exec` uses (runtime.jobview, runtime.environment, runtime.gpu), and
handed to the plugin's task hook as ``<runtime_dir>/slurm/<job>/view`` (format in
slurm_plugin/src/taskview.c)::

    bind=ro|rw<TAB>sys|user<TAB>SRC<TAB>DST
    env=NAME=VALUE          the image config's Env, in order
    append=NAME=VALUE       appended with ':' (GPU driver dirs)
    workdir=/path           the image config's WorkingDir
    devhide=NAME            a /dev entry the job does not see (a GPU not allocated to it)
    gpuids=ID,...           the job's Slurm GPU ids that are visible, ascending (= the order
                            CUDA numbers them inside: CUDA_VISIBLE_DEVICES is mapped onto it)

What the job asked for comes from the job control environment the plugin set where the
job was submitted: SPANK_OCI_SIF_MOUNTS, SPANK_OCI_SIF_NO_HOME, SPANK_OCI_SIF_GPU; the
site's binds and home policy from plugstack (binds=, home=). GPUs are bound on request
or when the job was allocated some (SLURM_JOB_GPUS / CUDA_VISIBLE_DEVICES); the /dev/nvidiaN
not in SLURM_JOB_GPUS are left out of the job's /dev (runtime.gpu.select).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from sifoverlay.errors import UsageError
from sifoverlay.fsio import REAL_IO, FileIO
from sifoverlay.runtime import jobview, state
from sifoverlay.runtime.jobview import Bind, Identity

from .config import SlurmConfig

__all__ = ["VIEW_FILE", "JobView", "finish", "plan"]

log = logging.getLogger(__name__)

VIEW_FILE: Final = "view"
PMIX_DIR: Final = "/.sifoverlay/pmix"  # SIFO_PMIX_DIR in slurm_plugin/src/sifoverlay.h


@dataclass(frozen=True, slots=True)
class JobView:
    identity: Identity
    binds: tuple[Bind, ...]
    append: tuple[tuple[str, str], ...]
    host_files: bool
    job_dir: str  # the runtime's directory of the job (view/ is written there)
    dev_hidden: tuple[str, ...] = ()  # /dev/nvidiaN the job was not allocated
    gpu_ids: tuple[int, ...] = ()  # the allocated Slurm GPU ids that are visible, ascending

    @property
    def mountpoints(self) -> list[tuple[str, bool]]:
        # + where a step's PMIx server directory is bound (srun --mpi=pmix; slurm_plugin/src/ctx_remote.c)
        return [*jobview.mountpoints(self.binds), (PMIX_DIR, True)]


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "") not in ("", "0")


def plan(uid: int, gid: int, mounts_dir: str, job_id: str, config: SlurmConfig, env: Mapping[str, str]) -> JobView:
    """Every bind of the job: user-named sources checked as the job user, the site's
    (plugstack binds=, the admin's word) as root - one missing on this node is skipped.
    `mounts_dir`: the runtime's base dir (SlurmConfig.mounts_dir)."""
    identity = Identity.lookup(uid, gid)
    user_binds = jobview.parse_binds(env.get("SPANK_OCI_SIF_MOUNTS", ""), what="--oci-sif-mounts")
    site: list[Bind] = []
    for bind in jobview.parse_binds(config.binds, what="plugstack binds=") if config.binds else []:
        if not os.path.exists(bind.source):
            log.warning("site bind %s does not exist on this node: skipped", bind.source)
            continue
        site.append(Bind(bind.source, bind.dest, bind.readonly, True, os.path.isdir(bind.source)))
    extra: tuple[Bind, ...] = ()
    append: tuple[tuple[str, str], ...] = ()
    if _flag(env, "SPANK_OCI_SIF_GPU") or _allocated_gpus(env):
        from sifoverlay.runtime import gpu

        extra, append = gpu.view_binds(gpu.discover())
    request = jobview.ViewRequest(tuple(user_binds), tuple(site),
                                  home=config.home and not _flag(env, "SPANK_OCI_SIF_NO_HOME"), extra=extra)
    job_dir = state.job_dir(mounts_dir, job_id)
    planned = jobview.plan(request, identity, os.path.join(job_dir, jobview.VIEW_DIR))
    hidden, ids = _devices(env)
    return JobView(identity, tuple(jobview.check_sources(planned, uid, gid)), append, request.host_files, job_dir,
                   hidden, ids)


def _devices(env: Mapping[str, str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(GPU nodes to hide, visible Slurm GPU ids) from the Prolog's SLURM_JOB_GPUS only: a
    step's GPUs and CUDA_VISIBLE_DEVICES are the task's (the device cgroup narrows a step)."""
    from sifoverlay.runtime import gpu

    allocation = {name: env[name] for name in ("SLURM_JOB_GPUS",) if env.get(name, "").strip()}
    chosen = gpu.select(allocation) if allocation else None
    if chosen is None:
        return (), ()
    minors = sorted(g.minor for g in chosen.visible)
    order = [g.minor for g in gpu.host_gpus()]
    return tuple(g.name for g in chosen.hidden), tuple(order.index(m) for m in minors)


def _allocated_gpus(env: Mapping[str, str]) -> bool:
    from sifoverlay.runtime import gpu

    return bool(gpu.allocated(env))


def finish(view: JobView, config: SlurmConfig, job_id: str, rootfs: str, image_fd: int, *,
           io: FileIO = REAL_IO) -> str:
    """After assembly: the identity files (read as the job user) and the view record.
    `image_fd`: the Prolog's authorized fd of the image (its config is read through it)."""
    from sifoverlay.ocisif import open_image
    from sifoverlay.runtime.embedded import ImageSettings
    from sifoverlay.sif.load import SifFile

    from . import records

    if view.host_files:
        jobview.write_identity(view.job_dir, rootfs, view.identity, io=io)
    with open_image(SifFile.from_fd(os.dup(image_fd), rootfs)) as img:
        image_config = img.config.json
    settings = ImageSettings.of(image_config)
    lines = []
    for bind in view.binds:
        for path in (bind.source, bind.dest):
            if any(c in path for c in "\t\n\0"):
                raise UsageError(path, "bind paths may not contain a tab or newline")
        lines.append(f"bind={'ro' if bind.readonly else 'rw'}\t{'sys' if bind.system else 'user'}\t"
                     f"{bind.source}\t{bind.dest}")
    lines += [f"env={name}={value}" for name, value in settings.env if "\n" not in value]
    lines += [f"append={name}={value}" for name, value in view.append]
    if settings.workdir and "\n" not in settings.workdir:
        lines.append(f"workdir={settings.workdir}")
    lines += [f"devhide={name}" for name in view.dev_hidden]
    if view.gpu_ids:
        lines.append("gpuids=" + ",".join(map(str, view.gpu_ids)))
    directory = records.job_dir(config.records_dir, job_id)
    io.makedirs(config.records_dir, 0o755)
    io.makedirs(directory, 0o755)
    path = os.path.join(directory, VIEW_FILE)
    io.write_file_atomic(path, ("\n".join(lines) + "\n").encode(), mode=0o644)
    return path
