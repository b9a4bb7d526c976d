"""A fake Vast.ai marketplace that the unmodified ``vastai`` SDK can talk to over HTTP.

Its contract is ``vast-api.md``; every rented "instance" is a real sshd (or main process) on
loopback, so tests, the README demo and the benchmarks run end to end without Vast.ai.
Start it with ``python -m tests.fakevast`` or, from tests, with ``harness.FakeVast``.
"""
