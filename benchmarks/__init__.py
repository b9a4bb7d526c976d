"""Benchmarks of the Vast.ai executor against the bundled fake marketplace.

Why a package of its own: the warm pool's claims (one instance for a chain, few API calls
per job, little billed idle time) are measured, not asserted, on fixed workflows with a fixed
boot time, and the numbers are written as JSON next to the code that produced them.
``python -m benchmarks --help`` runs it; ``benchmarks/README.md`` explains the numbers.
"""
