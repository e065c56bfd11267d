/*
 * Remote context (slurmstepd, one call per task, still root): start the task inside
 * the rootfs the Prolog assembled for the job, or fail it with the Prolog's refusal
 * on the job's stderr. A refused Prolog exits 0 (a failing Prolog drains the node),
 * so this is where a refusal becomes a failed job.
 */
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <slurm/slurm.h>

#include "sifoverlay.h"

static char batch_script_path[64];

static int fail_task(unsigned job_id, const char *fmt, ...)
{
	char msg[SIFO_MSG_MAX + 256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	/* In a task, slurm_error reaches both the job's stderr and the slurmd log. */
	sifo_error("job %u: %s", job_id, msg);
	return -1;
}

int sifo_remote_init(spank_t sp, int ac, char **av)
{
	if (sifo_config_parse(ac, av) < 0)
		return -1;
	return sifo_args_register(sp);
}

/* The batch script lives in slurmd's spool, outside the image: keep an fd to it
 * across the chroot and let the kernel execute it through /proc/self/fd. */
static int keep_batch_script(spank_t sp, unsigned job_id)
{
	int argc = 0, fd;
	char **argv = NULL;

	if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1 ||
	    !argv || !argv[0] || argv[0][0] != '/')
		return 0;
	fd = open(argv[0], O_RDONLY | O_NOCTTY);
	if (fd < 0)
		return fail_task(job_id, "cannot open the batch script %s", argv[0]);
	snprintf(batch_script_path, sizeof(batch_script_path), "/proc/self/fd/%d", fd);
	argv[0] = batch_script_path;
	return 0;
}

static void task_cwd(spank_t sp, char *buf, size_t len)
{
	if (spank_getenv(sp, "PWD", buf, (int)len) == ESPANK_SUCCESS && buf[0] == '/')
		return;
	if (!getcwd(buf, len))
		snprintf(buf, len, "/");
}

static char pmix_dir[PATH_MAX]; /* this step's PMIx server dir on the host ("" if none) */
static char task_cwds[3][PATH_MAX];
static int n_task_cwds = -1; /* -1: this task does not run in an image */
static bool task_cwd_required;

/* (task_init, as the job user, already inside the image) the working directory rules:
 * the first candidate, else the next with one warning line, else / (docs/slurm.md). */
int sifo_remote_task_init(spank_t sp, int ac, char **av)
{
	uint32_t job_id = 0;
	(void)ac;
	(void)av;

	if (n_task_cwds < 0)
		return 0;
	spank_get_item(sp, S_JOB_ID, &job_id);
	if (pmix_dir[0])
		sifo_rewrite_env_paths(sp, "PMIX_", pmix_dir, SIFO_PMIX_DIR);
	for (int i = 0; i < n_task_cwds; i++) {
		if (chdir(task_cwds[i]) == 0) {
			if (i > 0)
				dprintf(2, "sifoverlay: warning: %s does not exist in the image: working "
					"directory is %s\n", task_cwds[0], task_cwds[i]);
			return 0;
		}
		if (i == 0 && task_cwd_required)
			return fail_task(job_id, "working directory %s: No such file or directory in the image",
					 task_cwds[0]);
	}
	if (chdir("/") < 0)
		return fail_task(job_id, "chdir / in the image failed");
	if (n_task_cwds > 0 && strcmp(task_cwds[0], "/"))
		dprintf(2, "sifoverlay: warning: %s does not exist in the image: working directory is /\n",
			task_cwds[0]);
	return 0;
}

/* slurmd_spool_dir= with slurm.conf's SlurmdSpoolDir escapes: %n the node name, %h the
 * short host name (one spool dir per node on a shared filesystem, or several slurmd on
 * one host). The node name comes from SLURMD_NODENAME, taken only as one path component
 * (else the host name): the directory is opened as the job user anyway. */
static int expand_spool_dir(spank_t sp, char *out, size_t len)
{
	char node[256] = "", host[256] = "";
	const char *p;
	size_t used = 0;

	if (gethostname(host, sizeof(host) - 1) < 0)
		host[0] = '\0';
	host[strcspn(host, ".")] = '\0';
	if (spank_getenv(sp, "SLURMD_NODENAME", node, sizeof(node)) != ESPANK_SUCCESS || !node[0] ||
	    strchr(node, '/') || !strcmp(node, ".") || !strcmp(node, ".."))
		snprintf(node, sizeof(node), "%s", host);
	for (p = sifo_config.slurmd_spool_dir; *p; p++) {
		char one[2] = { *p, '\0' };
		const char *piece = one;
		size_t n;

		if (p[0] == '%' && (p[1] == 'n' || p[1] == 'h'))
			piece = *++p == 'n' ? node : host;
		n = strlen(piece);
		if (used + n >= len)
			return -1;
		memcpy(out + used, piece, n);
		used += n;
	}
	out[used] = '\0';
	return 0;
}

/* srun --mpi=pmix: the step's PMIx server directory (shared-memory store) is
 * <SlurmdSpoolDir>/pmix.<job>.<step>, outside the image, made before the tasks fork: bind
 * it on the stub mount point SIFO_PMIX_DIR. slurmstepd puts the PMIX_* variables naming
 * it into the task's environment only after this hook: task_init rewrites them. Opened as
 * the job user (a user bind): the directory is hers. */
static int add_pmix_bind(spank_t sp, uint32_t job_id, uint32_t step_id, struct sifo_view *view)
{
	struct sifo_bind *grown;
	struct stat st;
	char spool[PATH_MAX];

	pmix_dir[0] = '\0';
	if (expand_spool_dir(sp, spool, sizeof(spool)) < 0)
		return 0; /* too long to exist */
	snprintf(pmix_dir, sizeof(pmix_dir), "%s/pmix.%u.%u", spool, job_id, step_id);
	if (lstat(pmix_dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
		pmix_dir[0] = '\0';
		return 0;
	}
	grown = realloc(view->binds, sizeof(*grown) * (size_t)(view->n_binds + 1));
	if (!grown)
		return -1;
	view->binds = grown;
	view->binds[view->n_binds++] = (struct sifo_bind){ pmix_dir, (char *)SIFO_PMIX_DIR, false, false };
	return 0;
}

/* The job view (taskview.c), the job user's credentials for her bind sources, the
 * working directory candidates, then the environment (docs/slurm.md). */
static int enter_with_view(spank_t sp, uint32_t job_id, uint32_t step_id, const struct sifo_job_record *rec,
			   const char *cwd)
{
	struct sifo_view view;
	struct sifo_cred cred = { 0 };
	const char *cwds[3];
	int ncwds = 0, rc;
	char err[SIFO_MSG_MAX];

	if (sifo_task_opts_env_twins(sp, 1) < 0)
		return fail_task(job_id, "bad job environment option (see above)");
	if (sifo_view_load(sifo_config.runtime_dir, job_id, &view, err, sizeof(err)) < 0)
		return fail_task(job_id, "%s", err);
	if (spank_get_item(sp, S_JOB_UID, &cred.uid) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_GID, &cred.gid) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_SUPPLEMENTARY_GIDS, &cred.gids, &cred.ngids) != ESPANK_SUCCESS) {
		sifo_view_free(&view);
		return fail_task(job_id, "cannot read the job user's credentials");
	}
	if (sifo_opts.workdir_given) {
		cwds[ncwds++] = sifo_opts.workdir;
	} else {
		cwds[ncwds++] = cwd;
		if (view.workdir[0])
			cwds[ncwds++] = view.workdir;
	}
	/* slurmstepd chdirs to the submit dir after this hook (to /tmp if the image lacks
	 * it): the working directory is chosen in task_init, just before exec */
	n_task_cwds = 0;
	for (int i = 0; i < ncwds; i++)
		snprintf(task_cwds[n_task_cwds++], PATH_MAX, "%s", cwds[i]);
	task_cwd_required = sifo_opts.workdir_given;
	if (add_pmix_bind(sp, job_id, step_id, &view) < 0) {
		sifo_view_free(&view);
		return fail_task(job_id, "out of memory");
	}
	rc = sifo_enter_rootfs(rec->rootfs, &view, &cred, cwds, 0, false, err, sizeof(err));
	if (rc == 0 && sifo_apply_env(sp, &view, &sifo_opts, cred.uid, err, sizeof(err)) < 0)
		rc = -1;
	sifo_view_free(&view);
	if (rc < 0)
		return fail_task(job_id, "%s: %s", rec->image, err);
	return 0;
}

int sifo_remote_task_init_privileged(spank_t sp, int ac, char **av)
{
	struct sifo_job_record rec;
	char err[SIFO_MSG_MAX], cwd[PATH_MAX];
	uint32_t job_id = 0, step_id = 0;
	(void)ac;
	(void)av;

	if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS)
		return fail_task(job_id, "cannot read the job and step ids");
	if (step_id == SLURM_EXTERN_CONT)
		return 0;
	if (!sifo_request.given) {
		/* the environment twin, exported into the job by sbatch/srun */
		char value[PATH_MAX + 8];
		if (spank_getenv(sp, SIFO_ENV_TWIN, value, sizeof(value)) == ESPANK_SUCCESS && value[0]) {
			if (sifo_args_parse(value, &sifo_request, err, sizeof(err)) < 0)
				return fail_task(job_id, "%s (from %s)", err, SIFO_ENV_TWIN);
		}
	}
	if (sifo_job_record_wait(sifo_config.runtime_dir, job_id, &rec, SIFO_PREPARE_WAIT_S) < 0)
		return fail_task(job_id, "runtime_dir %s: path too long", sifo_config.runtime_dir);

	switch (rec.kind) {
	case SIFO_RECORD_NONE:
		if (!sifo_request.given)
			return 0; /* a job without an image */
		return fail_task(job_id, "%s: no rootfs was prepared for this job: give --%s when "
				 "the job is submitted (sbatch/salloc/srun), not only to a step "
				 "(or sifoverlay's Prolog is not set in slurm.conf)", sifo_request.path, SIFO_OPTION);
	case SIFO_RECORD_REFUSED:
	case SIFO_RECORD_BAD:
	case SIFO_RECORD_PREPARING: /* not after sifo_job_record_wait */
		return fail_task(job_id, "%s", rec.message);
	case SIFO_RECORD_READY:
		break;
	}
	if (sifo_request.given && strcmp(sifo_request.path, rec.image) != 0 &&
	    strcmp(sifo_request.path, rec.requested) != 0)
		return fail_task(job_id, "this step asks for %s but the job runs %s: one image per job",
				 sifo_request.path, rec.image);
	if (step_id == SLURM_BATCH_SCRIPT) {
		if (sifo_batch_shape_env_twin(sp) < 0)
			return fail_task(job_id, "bad %s (see above)", SIFO_BATCH_ENV);
		if (sifo_batch_on_host) {
			/* the pyxis shape: the script stays on the host; its srun steps enter the image */
			sifo_debug("job %u: batch script on the host, steps in %s", job_id, rec.image);
			return 0;
		}
	}
	task_cwd(sp, cwd, sizeof(cwd));
	if (step_id == SLURM_BATCH_SCRIPT && keep_batch_script(sp, job_id) < 0)
		return -1;
	if (enter_with_view(sp, job_id, step_id, &rec, cwd) < 0)
		return -1;
	sifo_debug("job %u step %u: task runs in %s (%s)", job_id, step_id, rec.image, rec.rootfs);
	return 0;
}
