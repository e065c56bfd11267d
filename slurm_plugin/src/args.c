/*
 * The option table (one row per option, registered in a loop) and its environment
 * twin: OCI_SIF_OVERLAY fills in only when --oci-sif-overlay was not given.
 *
 *   --oci-sif-overlay=PATH[:rw|:ro]   (mode defaults to the plugstack default_mode)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sifoverlay.h"

struct sifo_request sifo_request;

struct sifo_task_opts sifo_opts;

static int on_overlay_option(int val, const char *optarg, int remote);
static int on_task_option(int val, const char *optarg, int remote);

enum { OPT_MOUNTS = 1, OPT_WORKDIR, OPT_ENV, OPT_CLEANENV, OPT_NO_HOME, OPT_GPU, OPT_BATCH };

static struct spank_option option_table[] = {
	{ SIFO_OPTION, "PATH[:rw|:ro]",
	  "[" SIFO_PLUGIN "] run the job inside the OCI-SIF image at PATH with its ext3 "
	  "overlay writable (rw, default) or read-only (ro); the image is reconciled when "
	  "the job ends. Environment: " SIFO_ENV_TWIN,
	  1, 0, on_overlay_option },
	{ SIFO_BATCH_OPTION, "image|host",
	  "[" SIFO_PLUGIN "] where the batch script runs: inside the image (default) or on the "
	  "host, where it can call srun; srun steps always run in the image. Environment: "
	  SIFO_BATCH_ENV, 1, OPT_BATCH, on_task_option },
	{ "oci-sif-mounts", "SRC[:DST[:ro|rw]][,...]",
	  "[" SIFO_PLUGIN "] bind host paths into the image (given at submission: one list per "
	  "job). Environment: OCI_SIF_MOUNTS", 1, OPT_MOUNTS, on_task_option },
	{ "oci-sif-workdir", "DIR",
	  "[" SIFO_PLUGIN "] working directory inside the image (must exist; default: the "
	  "submit directory if it exists inside, else the image's WorkingDir). Environment: "
	  "OCI_SIF_WORKDIR", 1, OPT_WORKDIR, on_task_option },
	{ "oci-sif-env", "NAME[=VALUE][,...]",
	  "[" SIFO_PLUGIN "] NAME=VALUE: set inside (wins over all); NAME: keep the job's value "
	  "over the image's. Environment: OCI_SIF_ENV", 1, OPT_ENV, on_task_option },
	{ "oci-sif-cleanenv", NULL,
	  "[" SIFO_PLUGIN "] start from a clean environment (HOME, USER, TERM, LANG, LC_*, "
	  "SLURM_*, PMI*, ...). Environment: OCI_SIF_CLEANENV=1", 0, OPT_CLEANENV, on_task_option },
	{ "oci-sif-no-home", NULL,
	  "[" SIFO_PLUGIN "] do not bind $HOME. Environment: OCI_SIF_NO_HOME=1", 0, OPT_NO_HOME,
	  on_task_option },
	{ "oci-sif-gpu", NULL,
	  "[" SIFO_PLUGIN "] bind the NVIDIA driver's libraries and tools (automatic when the job "
	  "has GPUs). Environment: OCI_SIF_GPU=1", 0, OPT_GPU, on_task_option },
	SPANK_OPTIONS_TABLE_END
};

static int copy_opt(char *dst, size_t len, const char *name, const char *value)
{
	if (!value || !*value) {
		sifo_error("--%s needs a value", name);
		return -1;
	}
	if (strlen(value) >= len || strpbrk(value, "\n\t")) {
		sifo_error("--%s: value too long or has a tab or newline", name);
		return -1;
	}
	strcpy(dst, value);
	return 0;
}

/* SRC[:DST[:ro|rw]],... : absolute paths, no '..', a known flag (the Prolog checks the
 * sources as the job user; this only catches typos where the user can fix them). */
int sifo_mounts_check(const char *list, char *err, size_t errlen)
{
	char buf[4 * PATH_MAX];
	char *save = NULL;

	snprintf(buf, sizeof(buf), "%s", list);
	for (char *item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
		char *parts[4] = { NULL }, whole[4 * PATH_MAX];
		int n = 0;

		snprintf(whole, sizeof(whole), "%s", item);
		for (char *p = item, *s2 = NULL; n < 4 && (p = strtok_r(n ? NULL : item, ":", &s2)); n++)
			parts[n] = p;
		if (n == 2 && (!strcmp(parts[1], "ro") || !strcmp(parts[1], "rw"))) /* SRC:ro */
			continue;
		if (n < 1 || n > 3 || parts[0][0] != '/' || (n > 1 && parts[1][0] != '/') ||
		    (n > 2 && strcmp(parts[2], "ro") && strcmp(parts[2], "rw"))) {
			snprintf(err, errlen, "bad mount '%s': expected SRC[:DST[:ro|rw]] with absolute paths",
				 whole);
			return -1;
		}
		for (int i = 0; i < n && i < 2; i++)
			if (strstr(parts[i], "/../") || !strcmp(parts[i] + (strlen(parts[i]) >= 3 ?
			    strlen(parts[i]) - 3 : 0), "/..")) {
				snprintf(err, errlen, "bad mount path '%s': '..' is not allowed", parts[i]);
				return -1;
			}
	}
	return 0;
}

static int on_task_option(int val, const char *optarg, int remote)
{
	char err[SIFO_MSG_MAX];
	(void)remote;

	switch (val) {
	case OPT_MOUNTS:
		if (copy_opt(sifo_opts.mounts, sizeof(sifo_opts.mounts), "oci-sif-mounts", optarg) < 0)
			return -1;
		if (sifo_mounts_check(sifo_opts.mounts, err, sizeof(err)) < 0) {
			sifo_error("--oci-sif-mounts: %s", err);
			return -1;
		}
		sifo_opts.mounts_given = true;
		return 0;
	case OPT_WORKDIR:
		if (copy_opt(sifo_opts.workdir, sizeof(sifo_opts.workdir), "oci-sif-workdir", optarg) < 0)
			return -1;
		if (sifo_opts.workdir[0] != '/') {
			sifo_error("--oci-sif-workdir=%s: not an absolute path", optarg);
			return -1;
		}
		sifo_opts.workdir_given = true;
		return 0;
	case OPT_ENV:
		if (copy_opt(sifo_opts.env, sizeof(sifo_opts.env), "oci-sif-env", optarg) < 0)
			return -1;
		sifo_opts.env_given = true;
		return 0;
	case OPT_CLEANENV:
		sifo_opts.cleanenv = true;
		return 0;
	case OPT_NO_HOME:
		sifo_opts.no_home = true;
		return 0;
	case OPT_GPU:
		sifo_opts.gpu = true;
		return 0;
	case OPT_BATCH:
		return sifo_batch_shape_parse(optarg, "--" SIFO_BATCH_OPTION);
	}
	return -1;
}

static int twin_value(spank_t sp, int remote, const char *name, char *buf, size_t len)
{
	const char *v;

	if (remote)
		return spank_getenv(sp, name, buf, (int)len) == ESPANK_SUCCESS && buf[0] ? 0 : -1;
	v = getenv(name);
	if (!v || !*v || strlen(v) >= len)
		return -1;
	strcpy(buf, v);
	return 0;
}

static bool twin_flag(spank_t sp, int remote, const char *name)
{
	char buf[16];

	return twin_value(sp, remote, name, buf, sizeof(buf)) == 0 && strcmp(buf, "0") != 0;
}

/* The env twins of the job environment options, for those whose flag was absent. */
int sifo_task_opts_env_twins(spank_t sp, int remote)
{
	char buf[4 * PATH_MAX];

	if (!sifo_opts.mounts_given && twin_value(sp, remote, "OCI_SIF_MOUNTS", buf, sizeof(buf)) == 0 &&
	    on_task_option(OPT_MOUNTS, buf, remote) < 0)
		return -1;
	if (!sifo_opts.workdir_given && twin_value(sp, remote, "OCI_SIF_WORKDIR", buf, sizeof(buf)) == 0 &&
	    on_task_option(OPT_WORKDIR, buf, remote) < 0)
		return -1;
	if (!sifo_opts.env_given && twin_value(sp, remote, "OCI_SIF_ENV", buf, sizeof(buf)) == 0 &&
	    on_task_option(OPT_ENV, buf, remote) < 0)
		return -1;
	sifo_opts.cleanenv = sifo_opts.cleanenv || twin_flag(sp, remote, "OCI_SIF_CLEANENV");
	sifo_opts.no_home = sifo_opts.no_home || twin_flag(sp, remote, "OCI_SIF_NO_HOME");
	sifo_opts.gpu = sifo_opts.gpu || twin_flag(sp, remote, "OCI_SIF_GPU");
	return 0;
}

/* What the Prolog needs to plan the view: SPANK_OCI_SIF_MOUNTS, _NO_HOME, _GPU. */
int sifo_task_opts_to_prolog(spank_t sp)
{
	const char *names[] = { "OCI_SIF_MOUNTS", "OCI_SIF_NO_HOME", "OCI_SIF_GPU" };
	const char *values[] = { sifo_opts.mounts_given ? sifo_opts.mounts : NULL,
				 sifo_opts.no_home ? "1" : NULL, sifo_opts.gpu ? "1" : NULL };

	for (int i = 0; i < 3; i++) {
		spank_err_t rc;
		if (!values[i])
			continue;
		rc = spank_job_control_setenv(sp, names[i], values[i], 1);
		if (rc != ESPANK_SUCCESS) {
			sifo_error("cannot pass %s to the Prolog: %s", names[i], spank_strerror(rc));
			return -1;
		}
	}
	return 0;
}

const char *sifo_mode_name(enum sifo_mode mode)
{
	return mode == SIFO_MODE_RO ? "ro" : mode == SIFO_MODE_RW ? "rw" : "default";
}

/* Split PATH[:rw|:ro] and check the path's shape (not the file). */
int sifo_args_parse(const char *value, struct sifo_request *out, char *err, size_t errlen)
{
	size_t len;

	memset(out, 0, sizeof(*out));
	if (!value || !*value) {
		snprintf(err, errlen, "--%s needs a value: PATH[:rw|:ro]", SIFO_OPTION);
		return -1;
	}
	len = strlen(value);
	if (len >= sizeof(out->path)) {
		snprintf(err, errlen, "--%s: path too long", SIFO_OPTION);
		return -1;
	}
	strcpy(out->path, value);
	if (len > 3 && !strcmp(out->path + len - 3, ":rw")) {
		out->mode = SIFO_MODE_RW;
		out->path[len - 3] = '\0';
	} else if (len > 3 && !strcmp(out->path + len - 3, ":ro")) {
		out->mode = SIFO_MODE_RO;
		out->path[len - 3] = '\0';
	} else {
		const char *colon = strrchr(out->path, ':');
		if (colon && !strchr(colon, '/')) {
			snprintf(err, errlen, "--%s=%s: unknown mode '%s' (expected :rw or :ro)",
				 SIFO_OPTION, value, colon + 1);
			return -1;
		}
	}
	if (out->path[0] != '/') {
		snprintf(err, errlen, "--%s=%s: not an absolute path", SIFO_OPTION, value);
		return -1;
	}
	out->given = true;
	return 0;
}

static int on_overlay_option(int val, const char *optarg, int remote)
{
	char err[SIFO_MSG_MAX];
	(void)val;

	if (sifo_args_parse(optarg, &sifo_request, err, sizeof(err)) < 0) {
		sifo_error("%s", err);
		return -1;
	}
	/* The submitting side checks the file; slurmstepd trusts the Prolog's record. */
	if (!remote && sifo_check_ocisif(sifo_request.path, err, sizeof(err)) < 0) {
		sifo_error("--%s: %s", SIFO_OPTION, err);
		return -1;
	}
	return 0;
}

int sifo_args_register(spank_t sp)
{
	for (struct spank_option *opt = option_table; opt->name; opt++) {
		spank_err_t rc = spank_option_register(sp, opt);
		if (rc != ESPANK_SUCCESS) {
			sifo_error("cannot register --%s: %s", opt->name, spank_strerror(rc));
			return -1;
		}
	}
	return 0;
}

/* Second pass: the environment twin, used only when the flag was absent. */
int sifo_args_env_twin(spank_t sp)
{
	char err[SIFO_MSG_MAX];
	const char *value;
	(void)sp;

	if (sifo_request.given)
		return 0;
	value = getenv(SIFO_ENV_TWIN);
	if (!value || !*value)
		return 0;
	if (sifo_args_parse(value, &sifo_request, err, sizeof(err)) < 0) {
		sifo_error("%s (from %s)", err, SIFO_ENV_TWIN);
		return -1;
	}
	if (sifo_check_ocisif(sifo_request.path, err, sizeof(err)) < 0) {
		sifo_error("%s: %s", SIFO_ENV_TWIN, err);
		return -1;
	}
	sifo_request.from_env = true;
	return 0;
}
