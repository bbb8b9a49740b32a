"""Test-only: on PYTHONPATH with DDAEPP_TEST_STEP_SLEEP=<seconds>, every training step takes that much
longer (a sleep after the step, which changes no result), so that tests/test_slurm.py can run a
training segment several times longer than a 1-minute SLURM time limit on any machine."""

import os

if os.environ.get("DDAEPP_TEST_STEP_SLEEP"):
    import time

    try:
        from ddaepp import progress
    except ImportError:  # a Python without ddaepp (e.g. a system tool): nothing to slow down
        progress = None
    if progress is not None:
        seconds, advance = float(os.environ["DDAEPP_TEST_STEP_SLEEP"]), progress.Progress.advance

        def slow_advance(self, *args, **kwargs):  # Progress.advance: once per training step
            time.sleep(seconds)
            return advance(self, *args, **kwargs)

        progress.Progress.advance = slow_advance
