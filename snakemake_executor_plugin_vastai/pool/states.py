"""An instance's states and the moves between them, written down once.

Why apart from the table that enforces them: an instance knows its own state, and the table
knows its instances; with the states here neither module needs the other to say them.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    RENTING = "renting"  # reserved: counted toward the caps; search and create under way
    UNKNOWN = "unknown"  # the create's answer was lost: it may exist; settled by label
    BOOTING = "booting"
    BOOTSTRAPPING = "bootstrapping"
    IDLE = "idle"  # ready, no job on it
    BUSY = "busy"  # ready, one job or more on it
    LOST = "lost"  # its host stopped, vanished or went offline: to be destroyed
    DESTROYING = "destroying"  # destroy sent or to be retried; billing until confirmed
    GONE = "gone"  # confirmed gone, or never created
    KEPT = "kept"  # left up past the run's end (--vastai-keep-warm); its own switch ends it
    STOPPED = "stopped"  # idle, stopped by the run (--vastai-pool-stop-after): bills its disk


TRANSITIONS: dict[State, frozenset[State]] = {
    State.RENTING: frozenset({State.BOOTING, State.UNKNOWN, State.GONE}),
    State.UNKNOWN: frozenset({State.DESTROYING, State.GONE}),
    State.BOOTING: frozenset({State.BOOTSTRAPPING, State.LOST, State.DESTROYING}),
    State.BOOTSTRAPPING: frozenset({State.IDLE, State.BUSY, State.LOST, State.DESTROYING}),
    State.IDLE: frozenset({State.BUSY, State.LOST, State.DESTROYING, State.KEPT, State.STOPPED}),
    State.BUSY: frozenset({State.IDLE, State.LOST, State.DESTROYING}),
    State.LOST: frozenset({State.DESTROYING}),
    State.DESTROYING: frozenset({State.GONE}),
    State.GONE: frozenset(),
    State.KEPT: frozenset({State.DESTROYING}),  # its deadline could not be set: it goes
    # started again for a job (booting), or back to idle when the stop was refused
    State.STOPPED: frozenset({State.BOOTING, State.IDLE, State.DESTROYING}),
}
"""Every legal move. Anything may be destroyed once it exists; nothing comes back."""

ENTRY = frozenset({State.RENTING, State.IDLE})
"""How an instance enters a run's table: a rent as a reservation; an instance kept by an
earlier run ready, once this run has logged in to it and taken it over (adopted)."""

READY = frozenset({State.IDLE, State.BUSY})
STARTING = frozenset({State.BOOTING, State.BOOTSTRAPPING})
USABLE = READY | STARTING  # may run jobs now or soon
BILLING = frozenset(set(State) - {State.GONE})  # may cost money: counted toward every cap
