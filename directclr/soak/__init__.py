"""A chaos soak of `directclr pretrain` (python -m directclr.soak; what it does: run.py):
plan.py draws each cycle's configuration and faults, processes.py launches the runs and delivers
the faults, judge.py judges each launch and compares the finished run with the one left alone,
run.py runs the cycles (the command), summary.py sums them up."""
