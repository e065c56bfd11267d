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

static int on_overlay_option(int val, const char *optarg, int remote);

static struct spank_option option_table[] = {
	{ SIFO_OPTION, "PATH[:rw|:ro]",
	  "[" SIFO_PLUGIN "] run the job inside the OCI-SIF image at PATH with its ext3 "
	  "overlay writable (rw, default) or read-only (ro); the image is reconciled when "
	  "the job ends. Environment: " SIFO_ENV_TWIN,
	  1, 0, on_overlay_option },
	SPANK_OPTIONS_TABLE_END
};

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
