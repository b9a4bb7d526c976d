"""Programs that run on a rented instance, never here: the per-job agent and the resident
runner. Standard library only; the bootstrap writes them to the instance under names that
carry the hash of their source, so a new plugin version never talks to an old one."""
