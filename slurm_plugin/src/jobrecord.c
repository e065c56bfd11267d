/*
 * What the Prolog left for a job: <runtime_dir>/slurm/<jobid>/state, key=value lines
 *   status=ready|refused   image=/abs/path   requested=/abs/path   rootfs=/abs/path
 *   message=one line
 * written atomically by root. We believe it only when the file and its directory are
 * root-owned and not writable by others, and never follow a symlink to it.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sifoverlay.h"

#define RECORD_MAX 8192

static bool trusted(const struct stat *st)
{
	return st->st_uid == 0 && !(st->st_mode & (S_IWGRP | S_IWOTH));
}

static void copy_field(char *dst, size_t dstlen, const char *value)
{
	snprintf(dst, dstlen, "%s", value);
}

__attribute__((format(printf, 2, 3)))
static void bad(struct sifo_job_record *rec, const char *fmt, ...)
{
	va_list ap;

	rec->kind = SIFO_RECORD_BAD;
	va_start(ap, fmt);
	vsnprintf(rec->message, sizeof(rec->message), fmt, ap);
	va_end(ap);
}

int sifo_job_record_load(const char *runtime_dir, unsigned job_id, struct sifo_job_record *rec)
{
	char dir[PATH_MAX], name[16], buf[RECORD_MAX + 1], status[16] = "";
	struct stat st;
	ssize_t n;
	int pfd, dfd, fd;

	memset(rec, 0, sizeof(*rec));
	if (snprintf(dir, sizeof(dir), "%s/slurm/%u", runtime_dir, job_id) >= (int)sizeof(dir))
		return -1;
	/* <runtime_dir>/slurm itself must be root's: else a user could move another job's
	 * (root-owned) record directory into place. */
	snprintf(dir, sizeof(dir), "%s/slurm", runtime_dir);
	pfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (pfd < 0) {
		if (errno == ENOENT)
			return 0; /* no job on this node ever had an image */
		bad(rec, "cannot open %s", dir);
		return 0;
	}
	if (fstat(pfd, &st) < 0 || !trusted(&st)) {
		close(pfd);
		bad(rec, "%s is not a root-owned directory: refusing it", dir);
		return 0;
	}
	snprintf(name, sizeof(name), "%u", job_id);
	dfd = openat(pfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	close(pfd);
	snprintf(dir + strlen(dir), sizeof(dir) - strlen(dir), "/%s", name);
	if (dfd < 0) {
		if (errno == ENOENT)
			return 0; /* job without an image, or Prolog not configured */
		bad(rec, "cannot open %s", dir);
		return 0;
	}
	if (fstat(dfd, &st) < 0 || !trusted(&st)) {
		close(dfd);
		bad(rec, "%s is not a root-owned directory: refusing it", dir);
		return 0;
	}
	fd = openat(dfd, "state", O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	close(dfd);
	if (fd < 0) {
		bad(rec, "%s/state is missing: the Prolog did not finish", dir);
		return 0;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || !trusted(&st)) {
		close(fd);
		bad(rec, "%s/state is not a root-owned file: refusing it", dir);
		return 0;
	}
	n = read(fd, buf, RECORD_MAX);
	close(fd);
	if (n <= 0) {
		bad(rec, "%s/state is empty", dir);
		return 0;
	}
	buf[n] = '\0';

	for (char *save = NULL, *line = strtok_r(buf, "\n", &save); line;
	     line = strtok_r(NULL, "\n", &save)) {
		char *eq = strchr(line, '=');
		if (!eq)
			continue;
		*eq = '\0';
		if (!strcmp(line, "status"))
			copy_field(status, sizeof(status), eq + 1);
		else if (!strcmp(line, "image"))
			copy_field(rec->image, sizeof(rec->image), eq + 1);
		else if (!strcmp(line, "requested"))
			copy_field(rec->requested, sizeof(rec->requested), eq + 1);
		else if (!strcmp(line, "rootfs"))
			copy_field(rec->rootfs, sizeof(rec->rootfs), eq + 1);
		else if (!strcmp(line, "message"))
			copy_field(rec->message, sizeof(rec->message), eq + 1);
	}
	if (!strcmp(status, "ready") && rec->rootfs[0] == '/')
		rec->kind = SIFO_RECORD_READY;
	else if (!strcmp(status, "refused"))
		rec->kind = SIFO_RECORD_REFUSED;
	else
		bad(rec, "%s/state has no usable status", dir);
	return 0;
}
