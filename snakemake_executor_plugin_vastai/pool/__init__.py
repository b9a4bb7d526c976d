"""The warm pool: the instance table and each instance's states and slots, placement (which
instance, which share, wait or rent), renting under the caps, preparing a new instance (boot,
login, bootstrap), the destroyer, the reaper and the dead-man heartbeat, the run's ledger and
the progress lines about instances."""
