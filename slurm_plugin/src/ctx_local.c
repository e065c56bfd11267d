/*
 * Local (srun) and allocator (sbatch, salloc) contexts, as the submitting user:
 * register the option, validate the value where the user can still fix it, and hand
 * "PATH:MODE" to Prolog and Epilog (they see SPANK_OCI_SIF_OVERLAY).
 */
#include <stdio.h>

#include "sifoverlay.h"

int sifo_local_init(spank_t sp, int ac, char **av)
{
	if (sifo_config_parse(ac, av) < 0)
		return -1;
	return sifo_args_register(sp);
}

int sifo_local_post_opt(spank_t sp, int ac, char **av)
{
	char value[PATH_MAX + 8];
	spank_err_t rc;
	(void)ac;
	(void)av;

	if (sifo_args_env_twin(sp) < 0 || sifo_task_opts_env_twins(sp, 0) < 0)
		return -1;
	if (!sifo_request.given)
		return 0;
	if (sifo_task_opts_to_prolog(sp) < 0)
		return -1;
	if (sifo_request.mode == SIFO_MODE_UNSET)
		sifo_request.mode = sifo_config.default_mode;
	snprintf(value, sizeof(value), "%s:%s", sifo_request.path, sifo_mode_name(sifo_request.mode));
	rc = spank_job_control_setenv(sp, SIFO_CONTROL_VAR, value, 1);
	if (rc != ESPANK_SUCCESS) {
		sifo_error("cannot pass %s to the Prolog: %s", value, spank_strerror(rc));
		return -1;
	}
	sifo_debug("image %s (%s%s)", sifo_request.path, sifo_mode_name(sifo_request.mode),
		   sifo_request.from_env ? ", from " SIFO_ENV_TWIN : "");
	return 0;
}
