"""A rollout fleet inside a Slurm job (`launch/slurm.py --rollout-nodes K`): `job.py` gives each
node its role (servers and router, or the trainer), `serve.py` starts SGLang's server and router
with the job's API key taken from the environment, never from a command line."""
