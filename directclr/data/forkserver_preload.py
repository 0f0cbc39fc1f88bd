"""Imported by the forkserver that starts DataLoader workers (directclr.data.workers): it ignores
the stop signals a scheduler sends to every process of a job, since the trainer still needs new
workers until its checkpoint is written, and it dies with the trainer, its workers with it
(workers.prepare_forkserver)."""
from .workers import prepare_forkserver

prepare_forkserver()
