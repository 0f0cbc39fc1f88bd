"""Imported by the forkserver that starts DataLoader workers (directclr.data.workers): it ignores
the stop signals a scheduler sends to every process of a job (it ignores SIGINT by itself), since
the trainer still needs new workers until its checkpoint is written. It cannot outlive the
trainer: it exits when the trainer's end of its pipe closes."""
import signal

for _stop in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_stop, signal.SIG_IGN)
