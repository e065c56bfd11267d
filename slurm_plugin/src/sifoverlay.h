/*
 * sifoverlay SPANK plugin: shared declarations.
 *
 * spank_dispatch.c holds the only SPANK entry points and hands each call to the
 * file of the current context: ctx_local.c (srun, sbatch, salloc), ctx_remote.c
 * (slurmstepd), ctx_job_script.c (slurmd running Prolog/Epilog, and slurmd itself).
 */
#ifndef SIFOVERLAY_SPANK_H
#define SIFOVERLAY_SPANK_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <slurm/spank.h>

#define SIFO_PLUGIN "sifoverlay"
#define SIFO_OPTION "oci-sif-overlay"
#define SIFO_ENV_TWIN "OCI_SIF_OVERLAY"       /* used only when the flag is absent */
#define SIFO_CONTROL_VAR "OCI_SIF_OVERLAY"    /* Prolog/Epilog see SPANK_OCI_SIF_OVERLAY */
#define SIFO_MAX_ROOTS 16
#define SIFO_MSG_MAX 1024

/* Every log line starts with the plugin name. */
#define sifo_error(fmt, ...) slurm_error(SIFO_PLUGIN ": " fmt, ##__VA_ARGS__)
#define sifo_info(fmt, ...) slurm_info(SIFO_PLUGIN ": " fmt, ##__VA_ARGS__)
#define sifo_debug(fmt, ...) slurm_debug(SIFO_PLUGIN ": " fmt, ##__VA_ARGS__)

enum sifo_mode { SIFO_MODE_UNSET = 0, SIFO_MODE_RW, SIFO_MODE_RO };
enum sifo_mount { SIFO_MOUNT_FUSE = 0, SIFO_MOUNT_KERNEL };

/* config.c: plugstack arguments, parsed strictly (unknown key = error naming it). */
struct sifo_config {
	char journal_dir[PATH_MAX];
	char runtime_dir[PATH_MAX];
	char sifoverlay[PATH_MAX];   /* interpreter/executable running the Prolog/Epilog */
	char slurmd_spool_dir[PATH_MAX]; /* SlurmdSpoolDir (where srun --mpi=pmix puts its dirs) */
	char image_roots[SIFO_MAX_ROOTS][PATH_MAX];
	int n_image_roots;
	enum sifo_mode default_mode;
	enum sifo_mount mount;
};
extern struct sifo_config sifo_config;
int sifo_config_parse(int ac, char **av);

/* args.c: the option table, its registration and the environment twin. */
struct sifo_request {
	bool given;                  /* flag or env twin seen */
	bool from_env;
	char path[PATH_MAX];
	enum sifo_mode mode;         /* UNSET until defaults are applied */
};
extern struct sifo_request sifo_request;
int sifo_args_register(spank_t sp);
int sifo_args_parse(const char *value, struct sifo_request *out, char *err, size_t errlen);
int sifo_args_env_twin(spank_t sp);
const char *sifo_mode_name(enum sifo_mode mode);

/* ocisif_check.c: does the file look like an OCI-SIF? Reads only header + table. */
int sifo_check_ocisif(const char *path, char *err, size_t errlen);

/* jobrecord.c: what the Prolog left for a job in <runtime_dir>/slurm/<jobid>/. */
enum sifo_record { SIFO_RECORD_NONE = 0, SIFO_RECORD_READY, SIFO_RECORD_REFUSED, SIFO_RECORD_BAD,
		   SIFO_RECORD_PREPARING };
struct sifo_job_record {
	enum sifo_record kind;
	char image[PATH_MAX];        /* image path as the Prolog resolved it */
	char requested[PATH_MAX];    /* image path as the user gave it */
	char rootfs[PATH_MAX];       /* assembled rootfs (READY) */
	char message[SIFO_MSG_MAX];  /* refusal or problem (REFUSED, BAD) */
	long preparer_pid;           /* PREPARING: the Prolog's mounter, and its /proc start time */
	unsigned long long preparer_start;
};
int sifo_job_record_load(const char *runtime_dir, unsigned job_id, struct sifo_job_record *rec);
/* Load the record, waiting while it is PREPARING and its mounter lives (at most
 * timeout_s seconds): the result is never PREPARING (BAD with the reason instead). */
/* the job end waits 60 s for a mounter, then kills it (records.py): the task a little longer */
#define SIFO_PREPARE_WAIT_S 90
int sifo_job_record_wait(const char *runtime_dir, unsigned job_id, struct sifo_job_record *rec,
			 unsigned timeout_s);

/* args.c: the job environment options (issue 14); each has an env twin OCI_SIF_<NAME>
 * used when the flag is absent. */
#define SIFO_MAX_ENV 64
struct sifo_task_opts {
	char mounts[4 * PATH_MAX];   /* --oci-sif-mounts: SRC[:DST[:ro|rw]][,...] */
	char workdir[PATH_MAX];      /* --oci-sif-workdir */
	char env[4 * PATH_MAX];      /* --oci-sif-env: NAME[=VALUE][,...] */
	bool mounts_given, workdir_given, env_given, cleanenv, no_home, gpu;
};
extern struct sifo_task_opts sifo_opts;
int sifo_task_opts_env_twins(spank_t sp, int remote);
int sifo_task_opts_to_prolog(spank_t sp);
int sifo_mounts_check(const char *list, char *err, size_t errlen);

/* taskview.c: what the Prolog planned for the job's tasks (<runtime_dir>/slurm/<job>/view):
 * binds, the image's Env and WorkingDir, environment appends (runtime/jobview.py). */
struct sifo_bind {
	char *source, *dest;
	bool readonly, system;       /* system: root-made source (no check as the user) */
};
struct sifo_view {
	struct sifo_bind *binds;
	int n_binds;
	char **image_env;            /* NAME=VALUE, image config order */
	int n_image_env;
	char **append;               /* NAME=VALUE appended with ':' */
	int n_append;
	char workdir[PATH_MAX];      /* image WorkingDir ("" if none) */
	char **dev_hidden;           /* /dev entries left out of the job's /dev (GPUs not allocated) */
	int n_dev_hidden;
	const char *gpu_ids;         /* the job's visible Slurm GPU ids, ascending ("" if none) */
	char *buf;
};
#define SIFO_PMIX_DIR "/.sifoverlay/pmix"
int sifo_view_load(const char *runtime_dir, unsigned job_id, struct sifo_view *view, char *err, size_t errlen);
void sifo_view_free(struct sifo_view *view);
void sifo_rewrite_env_paths(spank_t sp, const char *prefix, const char *host_dir, const char *inside);
int sifo_apply_env(spank_t sp, const struct sifo_view *view, const struct sifo_task_opts *opts, uid_t uid,
		   char *err, size_t errlen);

/* rootfs.c: move the calling task into the rootfs (private mount namespace + chroot),
 * with the view's binds (user sources opened with the job user's credentials), then
 * the first of `cwds` that exists inside (a later one warns; cwd_required: only the first). */
struct sifo_cred {
	uid_t uid;
	gid_t gid;
	gid_t *gids;
	int ngids;
};
int sifo_enter_rootfs(const char *rootfs, const struct sifo_view *view, const struct sifo_cred *cred,
		      const char *const *cwds, int ncwds, bool cwd_required, char *err, size_t errlen);

/* jobshape.c: --oci-sif-batch=image|host (OCI_SIF_BATCH): where the batch script runs. */
#define SIFO_BATCH_OPTION "oci-sif-batch"
#define SIFO_BATCH_ENV "OCI_SIF_BATCH"
extern bool sifo_batch_on_host;
int sifo_batch_shape_parse(const char *value, const char *from);
int sifo_batch_shape_env_twin(spank_t sp);

/* Context handlers (one file each). */
int sifo_local_init(spank_t sp, int ac, char **av);
int sifo_local_post_opt(spank_t sp, int ac, char **av);
int sifo_remote_init(spank_t sp, int ac, char **av);
int sifo_remote_task_init_privileged(spank_t sp, int ac, char **av);
int sifo_remote_task_init(spank_t sp, int ac, char **av);
int sifo_job_script_init(spank_t sp, int ac, char **av);
int sifo_job_script_prolog(spank_t sp, int ac, char **av);
int sifo_job_script_epilog(spank_t sp, int ac, char **av);

#endif
