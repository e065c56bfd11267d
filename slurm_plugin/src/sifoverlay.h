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
enum sifo_record { SIFO_RECORD_NONE = 0, SIFO_RECORD_READY, SIFO_RECORD_REFUSED, SIFO_RECORD_BAD };
struct sifo_job_record {
	enum sifo_record kind;
	char image[PATH_MAX];        /* image path as the Prolog resolved it */
	char requested[PATH_MAX];    /* image path as the user gave it */
	char rootfs[PATH_MAX];       /* assembled rootfs (READY) */
	char message[SIFO_MSG_MAX];  /* refusal or problem (REFUSED, BAD) */
};
int sifo_job_record_load(const char *runtime_dir, unsigned job_id, struct sifo_job_record *rec);

/* rootfs.c: move the calling task into the rootfs (private mount namespace + chroot). */
int sifo_enter_rootfs(const char *rootfs, const char *cwd, char *err, size_t errlen);

/* Context handlers (one file each). */
int sifo_local_init(spank_t sp, int ac, char **av);
int sifo_local_post_opt(spank_t sp, int ac, char **av);
int sifo_remote_init(spank_t sp, int ac, char **av);
int sifo_remote_task_init_privileged(spank_t sp, int ac, char **av);
int sifo_job_script_init(spank_t sp, int ac, char **av);
int sifo_job_script_prolog(spank_t sp, int ac, char **av);
int sifo_job_script_epilog(spank_t sp, int ac, char **av);

#endif
