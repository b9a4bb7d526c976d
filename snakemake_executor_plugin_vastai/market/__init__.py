"""The marketplace: the one adapter to the vastai SDK (rate-paced calls, retries, the meaning
of each answer), and what a run asks of it: the request model and its offer query, the shares
a machine offers, the offer search and its shelf, the hosts a run excludes, and why no offer
matches (the diagnosis). Knows nothing of Snakemake, SSH or the pool."""
