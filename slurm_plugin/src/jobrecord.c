/*
 * What the Prolog left for a job: <runtime_dir>/slurm/<jobid>/state, key=value lines
 *   status=preparing|ready|refused   image=/abs/path   requested=/abs/path
 *   rootfs=/abs/path   message=one line   preparer=<pid>:<start ticks>
 * written atomically by root. "preparing": the Prolog has exited and its child (the
 * mounter, plugstack prolog_mounts=detached) is still mounting the rootfs; the task waits
 * for ready/refused while that process lives (sifo_job_record_wait). We believe it only when the file and its directory are
 * root-owned and not writable by others, and never follow a symlink to it.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
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
		else if (!strcmp(line, "preparer")) {
			char *colon = NULL;
			rec->preparer_pid = strtol(eq + 1, &colon, 10);
			if (colon && *colon == ':')
				rec->preparer_start = strtoull(colon + 1, NULL, 10);
			else
				rec->preparer_pid = 0;
		}
	}
	if (!strcmp(status, "ready") && rec->rootfs[0] == '/')
		rec->kind = SIFO_RECORD_READY;
	else if (!strcmp(status, "preparing") && rec->preparer_pid > 0)
		rec->kind = SIFO_RECORD_PREPARING;
	else if (!strcmp(status, "refused"))
		rec->kind = SIFO_RECORD_REFUSED;
	else
		bad(rec, "%s/state has no usable status", dir);
	return 0;
}

/* The process `pid` runs and started at `start` (field 22 of /proc/<pid>/stat, clock
 * ticks since boot): a recycled pid is not our mounter. A zombie has ended. */
static bool process_alive(long pid, unsigned long long start)
{
	char path[64], buf[1024], *p;
	unsigned long long started = 0;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return false;
	buf[n] = '\0';
	p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
	if (!p || p[1] != ' ')
		return false;
	p += 2; /* field 3: the state */
	if (*p == 'Z' || *p == 'X')
		return false;
	for (int field = 3; field < 22 && p; field++) {
		p = strchr(p, ' ');
		if (p)
			p++;
	}
	if (!p || sscanf(p, "%llu", &started) != 1)
		return false;
	return started == start;
}

int sifo_job_record_wait(const char *runtime_dir, unsigned job_id, struct sifo_job_record *rec,
			 unsigned timeout_s)
{
	struct timespec began, now, pause = { 0, 1000000 };
	long pid;
	unsigned long long start;

	clock_gettime(CLOCK_MONOTONIC, &began);
	for (;;) {
		if (sifo_job_record_load(runtime_dir, job_id, rec) < 0)
			return -1;
		if (rec->kind != SIFO_RECORD_PREPARING)
			return 0;
		pid = rec->preparer_pid;
		start = rec->preparer_start;
		if (!process_alive(pid, start)) {
			/* it may have written its last word and exited since the load */
			if (sifo_job_record_load(runtime_dir, job_id, rec) < 0)
				return -1;
			if (rec->kind != SIFO_RECORD_PREPARING)
				return 0;
			bad(rec, "%s: the Prolog's mounter (pid %ld) ended before the rootfs was ready "
			    "(the node's sifoverlay log says why)", rec->image, pid);
			return 0;
		}
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec - began.tv_sec >= (time_t)timeout_s) {
			bad(rec, "%s: the rootfs is still not ready after %u s (the Prolog's mounter, pid %ld, "
			    "is still at work)", rec->image, timeout_s, pid);
			return 0;
		}
		nanosleep(&pause, NULL);
		if (pause.tv_nsec < 16000000)
			pause.tv_nsec *= 2; /* 1, 2, 4, 8, 16 ms */
	}
}
