/*
 * The job view the Prolog planned (sifoverlay/slurm/taskview.py writes it next to the
 * state record): <runtime_dir>/slurm/<jobid>/view, one item per line
 *   bind=ro|rw<TAB>sys|user<TAB>SRC<TAB>DST
 *   env=NAME=VALUE        (the image config's Env, in order)
 *   append=NAME=VALUE     (appended to NAME with ':', e.g. the GPU driver's dirs)
 *   workdir=/path         (the image config's WorkingDir)
 *   devhide=NAME          (a /dev entry the job does not see: a GPU not allocated to it)
 *   gpuids=ID,...         (the job's visible Slurm GPU ids, ascending: CUDA's order inside)
 * Believed only when the directory and the file are root's and not writable by others,
 * and never through a symlink. And the task's environment, by the rules of
 * sifoverlay/runtime/environment.py (docs/slurm.md "Environment").
 */
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sifoverlay.h"

#define VIEW_MAX (1 << 20)
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

static bool root_only(int fd)
{
	struct stat st;

	return fstat(fd, &st) == 0 && st.st_uid == 0 && !(st.st_mode & (S_IWGRP | S_IWOTH));
}

static int open_trusted_dir(int at, const char *name)
{
	int fd = openat(at, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

	if (fd >= 0 && !root_only(fd)) {
		close(fd);
		errno = EPERM;
		return -1;
	}
	return fd;
}

void sifo_view_free(struct sifo_view *view)
{
	free(view->binds);
	free(view->image_env);
	free(view->append);
	free(view->dev_hidden);
	free(view->buf);
	memset(view, 0, sizeof(*view));
}

static int parse_bind(char *value, struct sifo_bind *b)
{
	char *save = NULL, *flag = strtok_r(value, "\t", &save), *kind = strtok_r(NULL, "\t", &save);

	b->source = strtok_r(NULL, "\t", &save);
	b->dest = strtok_r(NULL, "\t", &save);
	if (!flag || !kind || !b->source || !b->dest || b->source[0] != '/' || b->dest[0] != '/')
		return -1;
	b->readonly = !strcmp(flag, "ro");
	b->system = !strcmp(kind, "sys");
	return 0;
}

/* 0 with an empty view when there is no view file (a job prepared by an older Prolog). */
int sifo_view_load(const char *runtime_dir, unsigned job_id, struct sifo_view *view, char *err, size_t errlen)
{
	char name[16];
	int top, slurm, job, fd, lines = 0;
	ssize_t n, total = 0;

	memset(view, 0, sizeof(*view));
	top = open(runtime_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (top < 0) {
		snprintf(err, errlen, "cannot open %s: %s", runtime_dir, strerror(errno));
		return -1;
	}
	slurm = open_trusted_dir(top, "slurm");
	close(top);
	snprintf(name, sizeof(name), "%u", job_id);
	job = slurm >= 0 ? open_trusted_dir(slurm, name) : -1;
	if (slurm >= 0)
		close(slurm);
	if (job < 0) {
		snprintf(err, errlen, "%s/slurm/%u: %s", runtime_dir, job_id, strerror(errno));
		return -1;
	}
	fd = openat(job, "view", O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	close(job);
	if (fd < 0 && errno == ENOENT)
		return 0;
	if (fd < 0 || !root_only(fd)) {
		snprintf(err, errlen, "%s/slurm/%u/view is not a root-owned file", runtime_dir, job_id);
		if (fd >= 0)
			close(fd);
		return -1;
	}
	view->buf = malloc(VIEW_MAX + 1);
	if (!view->buf) {
		close(fd);
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	while (total < VIEW_MAX && (n = read(fd, view->buf + total, VIEW_MAX - total)) > 0)
		total += n;
	close(fd);
	view->buf[total] = '\0';
	for (char *p = view->buf; *p; p++)
		lines += *p == '\n';
	view->binds = calloc((size_t)lines + 1, sizeof(*view->binds));
	view->image_env = calloc((size_t)lines + 1, sizeof(char *));
	view->append = calloc((size_t)lines + 1, sizeof(char *));
	view->dev_hidden = calloc((size_t)lines + 1, sizeof(char *));
	view->gpu_ids = "";
	if (!view->binds || !view->image_env || !view->append || !view->dev_hidden) {
		sifo_view_free(view);
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	for (char *save = NULL, *line = strtok_r(view->buf, "\n", &save); line;
	     line = strtok_r(NULL, "\n", &save)) {
		if (!strncmp(line, "bind=", 5)) {
			if (parse_bind(line + 5, &view->binds[view->n_binds]) < 0) {
				snprintf(err, errlen, "job %u: bad bind line in the view", job_id);
				sifo_view_free(view);
				return -1;
			}
			view->n_binds++;
		} else if (!strncmp(line, "env=", 4) && strchr(line + 4, '=')) {
			view->image_env[view->n_image_env++] = line + 4;
		} else if (!strncmp(line, "append=", 7) && strchr(line + 7, '=')) {
			view->append[view->n_append++] = line + 7;
		} else if (!strncmp(line, "workdir=", 8) && line[8] == '/') {
			snprintf(view->workdir, sizeof(view->workdir), "%s", line + 8);
		} else if (!strncmp(line, "devhide=", 8) && line[8] && !strchr(line + 8, '/') &&
			   strcmp(line + 8, ".") && strcmp(line + 8, "..")) {
			view->dev_hidden[view->n_dev_hidden++] = line + 8;
		} else if (!strncmp(line, "gpuids=", 7)) {
			view->gpu_ids = line + 7;
		}
	}
	return 0;
}

static const char *const clean_keep[] = { "HOME", "USER", "LOGNAME", "TERM", "LANG", "LANGUAGE", "LC_ALL",
					  "TZ", "TMPDIR", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", NULL };
static const char *const clean_prefixes[] = { "LC_", "SLURM_", "SLURMD_", "PMI_", "PMIX_", "OMPI_", "MPIR_",
					      NULL };

static bool kept_by_cleanenv(const char *name)
{
	for (const char *const *k = clean_keep; *k; k++)
		if (!strcmp(name, *k))
			return true;
	for (const char *const *p = clean_prefixes; *p; p++)
		if (!strncmp(name, *p, strlen(*p)))
			return true;
	return false;
}

/* Is NAME listed bare (no '=') in the comma list? */
static bool listed_bare(const char *list, const char *name, size_t len)
{
	for (const char *p = list; p && *p;) {
		const char *end = strchr(p, ',');
		size_t n = end ? (size_t)(end - p) : strlen(p);
		if (n == len && !strncmp(p, name, len))
			return true;
		p = end ? end + 1 : NULL;
	}
	return false;
}

/* `in` with every `from` replaced by `to` (truncated to outlen). */
static void replace_all(const char *in, const char *from, const char *to, char *out, size_t outlen)
{
	size_t used = 0, flen = strlen(from);
	const char *hit;

	out[0] = '\0';
	while (flen && (hit = strstr(in, from)) && used < outlen) {
		used += (size_t)snprintf(out + used, outlen - used, "%.*s%s", (int)(hit - in), in, to);
		in = hit + flen;
	}
	if (used < outlen)
		snprintf(out + used, outlen - used, "%s", in);
}

static int set(spank_t sp, const char *name, const char *value, char *err, size_t errlen)
{
	spank_err_t rc = spank_setenv(sp, name, value, 1);

	if (rc != ESPANK_SUCCESS) {
		snprintf(err, errlen, "cannot set %s: %s", name, spank_strerror(rc));
		return -1;
	}
	return 0;
}

/* Position of `id` in the comma list `ids`, -1 if absent. */
static int position_in(const char *ids, long id)
{
	int pos = 0;

	for (const char *p = ids; p && *p; pos++) {
		char *end;
		long have = strtol(p, &end, 10);
		if (end == p)
			return -1;
		if (have == id)
			return pos;
		p = *end == ',' ? end + 1 : NULL;
	}
	return -1;
}

/* Slurm without ConstrainDevices exports the global GPU ids in CUDA_VISIBLE_DEVICES (the same
 * list as SLURM_STEP_GPUS, or SLURM_JOB_GPUS in a batch step); in the job's /dev only the
 * job's GPUs are left, which CUDA numbers from 0: map each id to its position among them
 * (runtime/gpu.py does the same for exec). Relative values (ConstrainDevices=yes) already
 * count what CUDA sees and are left alone, as are UUIDs. */
static int renumber_cuda_devices(spank_t sp, const struct sifo_view *view, char *err, size_t errlen)
{
	char cvd[1024], ids[1024], out[1024];
	size_t used = 0;

	if (!view->gpu_ids || !view->gpu_ids[0] || spank_getenv(sp, "CUDA_VISIBLE_DEVICES", cvd, sizeof(cvd)) != ESPANK_SUCCESS)
		return 0;
	if (spank_getenv(sp, "SLURM_STEP_GPUS", ids, sizeof(ids)) != ESPANK_SUCCESS &&
	    spank_getenv(sp, "SLURM_JOB_GPUS", ids, sizeof(ids)) != ESPANK_SUCCESS)
		return 0;
	if (strcmp(cvd, ids))
		return 0;
	out[0] = '\0';
	for (const char *p = cvd; *p;) {
		char *end;
		long id = strtol(p, &end, 10);
		int pos = end == p ? -1 : position_in(view->gpu_ids, id);
		if (pos < 0 || (*end && *end != ','))
			return 0;
		used += (size_t)snprintf(out + used, sizeof(out) - used, "%s%d", used ? "," : "", pos);
		if (used >= sizeof(out))
			return 0;
		p = *end ? end + 1 : end;
	}
	return set(sp, "CUDA_VISIBLE_DEVICES", out, err, errlen);
}

int sifo_apply_env(spank_t sp, const struct sifo_view *view, const struct sifo_task_opts *opts, uid_t uid,
		   char *err, size_t errlen)
{
	char name[256], value[8192], pwbuf[4096];
	char **env = NULL;
	struct passwd pw, *found = NULL;

	/* 1. cleanenv: only the kept names survive */
	if (opts->cleanenv && spank_get_item(sp, S_JOB_ENV, &env) == ESPANK_SUCCESS && env) {
		char *names[4096];
		int n = 0;
		for (char **e = env; *e && n < 4096; e++) {
			const char *eq = strchr(*e, '=');
			if (!eq || (size_t)(eq - *e) >= sizeof(name))
				continue;
			memcpy(name, *e, (size_t)(eq - *e));
			name[eq - *e] = '\0';
			if (!kept_by_cleanenv(name) && !listed_bare(opts->env, name, strlen(name)))
				names[n++] = strdup(name);
		}
		for (int i = 0; i < n; i++) {
			if (names[i])
				spank_unsetenv(sp, names[i]);
			free(names[i]);
		}
	}
	/* 2. the job user's HOME, USER and LOGNAME */
	if (getpwuid_r(uid, &pw, pwbuf, sizeof(pwbuf), &found) == 0 && found) {
		if (set(sp, "HOME", found->pw_dir, err, errlen) < 0 || set(sp, "USER", found->pw_name, err, errlen) < 0 ||
		    set(sp, "LOGNAME", found->pw_name, err, errlen) < 0)
			return -1;
	}
	/* 3. the image's Env wins, except the names kept with a bare --oci-sif-env NAME */
	for (int i = 0; i < view->n_image_env; i++) {
		const char *entry = view->image_env[i], *eq = strchr(entry, '=');
		size_t len = (size_t)(eq - entry);
		if (len >= sizeof(name))
			continue;
		memcpy(name, entry, len);
		name[len] = '\0';
		if (listed_bare(opts->env, name, len) &&
		    spank_getenv(sp, name, value, sizeof(value)) == ESPANK_SUCCESS)
			continue;
		if (set(sp, name, eq + 1, err, errlen) < 0)
			return -1;
	}
	/* 4. a PATH in any case */
	if (spank_getenv(sp, "PATH", value, sizeof(value)) != ESPANK_SUCCESS &&
	    set(sp, "PATH", DEFAULT_PATH, err, errlen) < 0)
		return -1;
	/* 5. runtime additions */
	for (int i = 0; i < view->n_append; i++) {
		const char *entry = view->append[i], *eq = strchr(entry, '=');
		char joined[8192];
		size_t len = (size_t)(eq - entry);
		if (len >= sizeof(name))
			continue;
		memcpy(name, entry, len);
		name[len] = '\0';
		if (spank_getenv(sp, name, value, sizeof(value)) == ESPANK_SUCCESS && value[0])
			snprintf(joined, sizeof(joined), "%s:%s", value, eq + 1);
		else
			snprintf(joined, sizeof(joined), "%s", eq + 1);
		if (set(sp, name, joined, err, errlen) < 0)
			return -1;
	}
	/* 5b. CUDA numbers the GPUs it sees in the job's /dev from 0 */
	if (renumber_cuda_devices(sp, view, err, errlen) < 0)
		return -1;
	/* 6. --oci-sif-env NAME=VALUE wins over everything */
	if (opts->env[0]) {
		char list[sizeof(opts->env)];
		char *save = NULL;
		snprintf(list, sizeof(list), "%s", opts->env);
		for (char *item = strtok_r(list, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
			char *eq = strchr(item, '=');
			if (!eq)
				continue;
			*eq = '\0';
			if (set(sp, item, eq + 1, err, errlen) < 0)
				return -1;
		}
	}
	return 0;
}

/* Every variable starting with `prefix` whose value names `host_dir`: named `inside` instead. */
void sifo_rewrite_env_paths(spank_t sp, const char *prefix, const char *host_dir, const char *inside)
{
	char **env = NULL, *todo[256], err[SIFO_MSG_MAX];
	int n = 0;

	if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS || !env)
		return;
	for (char **e = env; *e && n < 256; e++)
		if (!strncmp(*e, prefix, strlen(prefix)) && strstr(*e, host_dir))
			todo[n++] = strdup(*e);
	for (int i = 0; i < n; i++) {
		char *eq = todo[i] ? strchr(todo[i], '=') : NULL, out[8192];
		if (eq) {
			*eq = '\0';
			replace_all(eq + 1, host_dir, inside, out, sizeof(out));
			if (set(sp, todo[i], out, err, sizeof(err)) < 0)
				sifo_error("%s", err);
		}
		free(todo[i]);
	}
}
