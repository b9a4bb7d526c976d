"""The Snakemake edge: the ``--vastai-*`` settings, a job's resources read into plain job
facts, the checks before anything is rented, the run's context and each job's thread, the
summary, and every use of a private Snakemake internal (``snakemake_internals``). Only this
room (with the executor above it and ``remote/onhost/runner.py`` on the host) imports
Snakemake."""
