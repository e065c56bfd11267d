/*
 * Where the batch script runs (docs/slurm.md "Job shapes"):
 *
 *   --oci-sif-batch=image   (default) the batch script runs inside the image, like every step
 *   --oci-sif-batch=host    the batch script runs on the host, so it can call srun; every
 *                           srun step inside the job still runs in the image (the pyxis shape)
 *
 * Environment twin: OCI_SIF_BATCH (used only when the flag is absent). Only the batch step
 * looks at it: srun steps always run in the job's image.
 */
#include <stdio.h>
#include <string.h>

#include "sifoverlay.h"

bool sifo_batch_on_host;
static bool batch_given;

int sifo_batch_shape_parse(const char *value, const char *from)
{
	if (value && !strcmp(value, "image"))
		sifo_batch_on_host = false;
	else if (value && !strcmp(value, "host"))
		sifo_batch_on_host = true;
	else {
		sifo_error("%s=%s: expected image or host", from, value ? value : "");
		return -1;
	}
	batch_given = true;
	return 0;
}

int sifo_batch_shape_env_twin(spank_t sp)
{
	char value[16];

	if (batch_given)
		return 0;
	if (spank_getenv(sp, SIFO_BATCH_ENV, value, sizeof(value)) != ESPANK_SUCCESS || !value[0])
		return 0;
	return sifo_batch_shape_parse(value, SIFO_BATCH_ENV);
}
