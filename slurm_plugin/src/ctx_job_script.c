/*
 * slurmd and job_script contexts. slurmd parses the plugstack line at start-up, so a
 * bad key stops slurmd with a message naming it. The Prolog/Epilog work itself is done
 * by the Python Prolog= / Epilog= programs (sifoverlay.slurm.prolog / .epilog): they
 * read SPANK_OCI_SIF_OVERLAY. Here we only log, and never fail: a failing job_script
 * hook would drain the node.
 */
#include "sifoverlay.h"

static int log_request(spank_t sp, const char *phase, int ac, char **av)
{
	struct spank_option probe = { SIFO_OPTION, NULL, NULL, 1, 0, NULL };
	char *value = NULL;
	uint32_t job_id = 0;

	if (sifo_config_parse(ac, av) < 0)
		sifo_error("%s: plugstack arguments are invalid (see above)", phase);
	spank_get_item(sp, S_JOB_ID, &job_id);
	if (spank_option_getopt(sp, &probe, &value) == ESPANK_SUCCESS && value)
		sifo_debug("%s: job %u asked for %s", phase, job_id, value);
	return 0;
}

int sifo_job_script_init(spank_t sp, int ac, char **av)
{
	(void)sp;
	if (spank_context() == S_CTX_SLURMD)
		return sifo_config_parse(ac, av);
	return 0;
}

int sifo_job_script_prolog(spank_t sp, int ac, char **av)
{
	return log_request(sp, "job prolog", ac, av);
}

int sifo_job_script_epilog(spank_t sp, int ac, char **av)
{
	return log_request(sp, "job epilog", ac, av);
}
