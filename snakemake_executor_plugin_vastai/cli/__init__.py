"""The ``snakemake-vastai`` command: offers (a preview of what a workflow would rent), status,
cost and cleanup of earlier runs."""
