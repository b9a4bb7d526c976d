"""The remote side: SSH to an instance (the one user of paramiko), the bootstrap and the
onstart script, staging files up and back, the job wire to the agent, the run's key and the
credentials forwarded to jobs. ``onhost/`` holds the programs that run on the rented machine
itself, on the standard library alone."""
