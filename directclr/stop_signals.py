"""The stop signals (a scheduler's preemption notice, Ctrl-C): a handler that turns them into a
flag the training loop reads between steps, and the exception that ends a run stopped by one.

Imports nothing but the standard library: the command line installs the handler before it
imports torch (directclr.cli.main), so a signal during those seconds of start-up is caught too.
directclr.preemption has the rest (the ranks' stop vote, the divergence guard).
"""
from __future__ import annotations

import logging
import signal
import threading

# The run's messages keep the one logger name that users and tests filter on.
log = logging.getLogger("directclr.train")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class RunStopped(Exception):
    """The run ended early on purpose; `exit_code` is what the command returns."""
    exit_code = 1


class Preempted(RunStopped):
    exit_code = EXIT_PREEMPTED


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 set a flag the loop reads between steps. Repeats are not an
    abort: a worker under srun + torchrun gets the scheduler's SIGTERM and then torchrun's.

    Entered while another StopSignals handles them (the command's, from its start), it takes
    over the signal that one received. `announce=False` records without the log line, which
    promises a checkpoint that only the loop writes."""

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.received: str | None = None
        self.previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
            outer = getattr(self.previous[signal.SIGTERM], "__self__", None)
            if isinstance(outer, StopSignals):
                self.received = outer.received
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
        if self.announce:
            log.warning("%s: stopping after this step with a checkpoint (kill -9 stops at once)",
                        name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def ignore_after(self) -> None:
        """Within the block: on leaving it, the stop signals are ignored instead of handed back.
        For a run that is done: a scheduler's late SIGTERM during the seconds Python takes to
        shut down would otherwise turn its exit 0 into a kill."""
        self.previous = dict.fromkeys(self.previous, signal.SIG_IGN)

    def hand_back(self) -> None:
        """After __exit__: the signal received, if any, to the handlers it had replaced, as if it
        came now (the default ones end the process as they would have)."""
        if self.received is not None:
            signal.raise_signal(signal.Signals[self.received])

    def stop_before_loop(self, world: int) -> None:
        """Raises Preempted when a single process has received a stop signal: called before the
        run writes anything, it ends a start-up with nothing to save. Several ranks stop at the
        first step boundary instead, where they agree on it (agreed_stop) as on any stop
        signal."""
        if world == 1 and self.received is not None:
            raise Preempted(f"stopped by {self.received} during start-up; nothing to save: "
                            "rerun the same command")
