/*
 * The only file with SPANK entry points: each one switches on the context and hands
 * the call to that context's file. Everything else is static state in those files.
 */
#include "sifoverlay.h"

SPANK_PLUGIN(sifoverlay, 1);

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	switch (spank_context()) {
	case S_CTX_LOCAL:
	case S_CTX_ALLOCATOR:
		return sifo_local_init(sp, ac, av);
	case S_CTX_REMOTE:
		return sifo_remote_init(sp, ac, av);
	case S_CTX_SLURMD:
	case S_CTX_JOB_SCRIPT:
		/* slurmd: a bad plugstack line fails slurmd start-up, loudly. */
		return sifo_job_script_init(sp, ac, av);
	default:
		return ESPANK_SUCCESS;
	}
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	switch (spank_context()) {
	case S_CTX_LOCAL:
	case S_CTX_ALLOCATOR:
		return sifo_local_post_opt(sp, ac, av);
	default:
		return ESPANK_SUCCESS;
	}
}

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	if (spank_context() != S_CTX_REMOTE)
		return ESPANK_SUCCESS;
	return sifo_remote_task_init_privileged(sp, ac, av);
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	if (spank_context() != S_CTX_REMOTE)
		return ESPANK_SUCCESS;
	return sifo_remote_task_init(sp, ac, av);
}

int slurm_spank_job_prolog(spank_t sp, int ac, char **av)
{
	if (spank_context() != S_CTX_JOB_SCRIPT)
		return ESPANK_SUCCESS;
	return sifo_job_script_prolog(sp, ac, av);
}

int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
	if (spank_context() != S_CTX_JOB_SCRIPT)
		return ESPANK_SUCCESS;
	return sifo_job_script_epilog(sp, ac, av);
}
