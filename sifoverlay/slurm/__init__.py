"""Slurm integration: the Python half of the SPANK plugin in slurm_plugin/.

Entry points (absolute paths, no PATH assumed): `prolog.main` (slurm.conf Prolog=),
`epilog.main` (Epilog=), `sweeper.main` (`sifoverlay recover --slurm`, systemd timer).
Job liveness: `jobstate.select_backend()` -> `JobState` (pyslurm or the Slurm CLI).
"""
