/*
 * Plugstack arguments, parsed strictly: only known keys, fixed words for enums,
 * absolute paths that fit. An unknown key fails the plugin with a message naming it:
 * a loud failure when slurmd starts beats a silent default on every job.
 *
 *   journal_dir=/var/lib/sifoverlay/journal   runtime_dir=/run/sifoverlay
 *   image_roots=/shared/images:/scratch       default_mode=rw|ro
 *   sifoverlay=/opt/sifoverlay/bin/python     mount=fuse|kernel
 *   state_dir=/var/lib/sifoverlay              (root's lease/journal state, docs/security.md)
 *   max_overlay=256G                           (bytes, or K/M/G/T binary units)
 *   min_free=1G                                (bytes: rw jobs refused at Prolog below this; issue 18)
 *   hash_deadline=600                          (seconds the Epilog may hash; then the sweeper)
 *   lease_ttl=180 lease_grace=120              (seconds: lease heartbeat lifetime, takeover grace)
 *   binds=/scratch,/shared:ro                  (site binds of every job: SRC[:DST[:ro|rw]],...)
 *   home=yes|no                                (bind the job user's $HOME; default yes)
 *   epilog_reconcile=async|sync                (rw job end: hash in a worker after the node is
 *                                               free, or inside the Epilog; default async)
 *   prolog_mounts=detached|inline              (job start: the Prolog exits once the lease is held
 *                                               and its child mounts while the job starts; or all
 *                                               inside the Prolog; default detached)
 *   slurmd_spool_dir=/var/spool/slurmd         (slurm.conf SlurmdSpoolDir: srun --mpi=pmix dirs)
 * slurmd_spool_dir is the plugin's only; state_dir and the other keys after it are used by
 * the Python side only; they are checked on both sides with the same rules so both halves
 * accept exactly the same lines.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "sifoverlay.h"

struct sifo_config sifo_config;
static char state_dir[PATH_MAX]; /* validated only: the Prolog/Epilog read it themselves */

/* A positive decimal number with an optional K/M/G/T (binary) suffix; -1 when invalid. */
static int check_size(const char *key, const char *value, int allow_suffix)
{
	const char *p = value;
	size_t digits = 0;

	while (*p >= '0' && *p <= '9') {
		p++;
		digits++;
	}
	if (digits == 0 || digits > 15 || (*p && (!allow_suffix || p[1] || !strchr("KMGT", *p)))) {
		sifo_error("plugstack: %s=%s: expected a positive number%s", key, value,
			   allow_suffix ? " (optionally with K, M, G or T)" : "");
		return -1;
	}
	for (const char *q = value; q < value + digits; q++)
		if (*q != '0')
			return 0;
	sifo_error("plugstack: %s=%s: must be positive", key, value);
	return -1;
}

static int copy_abs_path(const char *key, const char *value, char *dst, size_t dstlen)
{
	if (value[0] != '/') {
		sifo_error("plugstack: %s=%s: not an absolute path", key, value);
		return -1;
	}
	if (strlen(value) >= dstlen) {
		sifo_error("plugstack: %s: path too long (max %zu)", key, dstlen - 1);
		return -1;
	}
	if (strstr(value, "/../") || (strlen(value) >= 3 && !strcmp(value + strlen(value) - 3, "/.."))) {
		sifo_error("plugstack: %s=%s: '..' is not allowed", key, value);
		return -1;
	}
	strcpy(dst, value);
	return 0;
}

static int parse_roots(const char *value)
{
	char buf[SIFO_MAX_ROOTS * PATH_MAX];
	char *save = NULL, *tok;

	if (strlen(value) >= sizeof(buf)) {
		sifo_error("plugstack: image_roots: value too long");
		return -1;
	}
	strcpy(buf, value);
	sifo_config.n_image_roots = 0;
	for (tok = strtok_r(buf, ":", &save); tok; tok = strtok_r(NULL, ":", &save)) {
		if (sifo_config.n_image_roots == SIFO_MAX_ROOTS) {
			sifo_error("plugstack: image_roots: more than %d roots", SIFO_MAX_ROOTS);
			return -1;
		}
		if (copy_abs_path("image_roots", tok, sifo_config.image_roots[sifo_config.n_image_roots],
				  PATH_MAX) < 0)
			return -1;
		sifo_config.n_image_roots++;
	}
	if (sifo_config.n_image_roots == 0) {
		sifo_error("plugstack: image_roots: empty list");
		return -1;
	}
	return 0;
}

static int parse_one(const char *arg)
{
	const char *eq = strchr(arg, '=');
	char key[64];
	const char *value;

	if (!eq || eq == arg || (size_t)(eq - arg) >= sizeof(key)) {
		sifo_error("plugstack: argument '%s' is not key=value", arg);
		return -1;
	}
	memcpy(key, arg, (size_t)(eq - arg));
	key[eq - arg] = '\0';
	value = eq + 1;
	if (!*value) {
		sifo_error("plugstack: %s: empty value", key);
		return -1;
	}

	if (!strcmp(key, "journal_dir"))
		return copy_abs_path(key, value, sifo_config.journal_dir, sizeof(sifo_config.journal_dir));
	if (!strcmp(key, "runtime_dir"))
		return copy_abs_path(key, value, sifo_config.runtime_dir, sizeof(sifo_config.runtime_dir));
	if (!strcmp(key, "state_dir"))
		return copy_abs_path(key, value, state_dir, sizeof(state_dir));
	if (!strcmp(key, "max_overlay") || !strcmp(key, "min_free"))
		return check_size(key, value, 1);
	if (!strcmp(key, "hash_deadline") || !strcmp(key, "lease_ttl") || !strcmp(key, "lease_grace"))
		return check_size(key, value, 0);
	if (!strcmp(key, "binds")) {
		char err[SIFO_MSG_MAX];
		if (strlen(value) >= 4 * PATH_MAX || sifo_mounts_check(value, err, sizeof(err)) < 0) {
			sifo_error("plugstack: binds=%s: %s", value,
				   strlen(value) >= 4 * PATH_MAX ? "too long" : err);
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "slurmd_spool_dir"))
		return copy_abs_path(key, value, sifo_config.slurmd_spool_dir,
				     sizeof(sifo_config.slurmd_spool_dir));
	if (!strcmp(key, "epilog_reconcile")) {
		if (strcmp(value, "async") && strcmp(value, "sync")) {
			sifo_error("plugstack: epilog_reconcile=%s: expected async or sync", value);
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "prolog_mounts")) {
		if (strcmp(value, "detached") && strcmp(value, "inline")) {
			sifo_error("plugstack: prolog_mounts=%s: expected detached or inline", value);
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "home")) {
		if (strcmp(value, "yes") && strcmp(value, "no")) {
			sifo_error("plugstack: home=%s: expected yes or no", value);
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "sifoverlay"))
		return copy_abs_path(key, value, sifo_config.sifoverlay, sizeof(sifo_config.sifoverlay));
	if (!strcmp(key, "image_roots"))
		return parse_roots(value);
	if (!strcmp(key, "default_mode")) {
		if (!strcmp(value, "rw"))
			sifo_config.default_mode = SIFO_MODE_RW;
		else if (!strcmp(value, "ro"))
			sifo_config.default_mode = SIFO_MODE_RO;
		else {
			sifo_error("plugstack: default_mode=%s: expected rw or ro", value);
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "mount")) {
		if (!strcmp(value, "fuse"))
			sifo_config.mount = SIFO_MOUNT_FUSE;
		else if (!strcmp(value, "kernel"))
			sifo_config.mount = SIFO_MOUNT_KERNEL;
		else {
			sifo_error("plugstack: mount=%s: expected fuse or kernel", value);
			return -1;
		}
		return 0;
	}
	sifo_error("plugstack: unknown key '%s'", key);
	return -1;
}

int sifo_config_parse(int ac, char **av)
{
	memset(&sifo_config, 0, sizeof(sifo_config));
	strcpy(sifo_config.journal_dir, "/var/lib/sifoverlay/journal");
	strcpy(sifo_config.runtime_dir, "/run/sifoverlay");
	strcpy(sifo_config.slurmd_spool_dir, "/var/spool/slurmd");
	sifo_config.default_mode = SIFO_MODE_RW;
	sifo_config.mount = SIFO_MOUNT_FUSE;

	for (int i = 0; i < ac; i++)
		if (parse_one(av[i]) < 0)
			return -1;
	return 0;
}
