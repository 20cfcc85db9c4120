"""``python -m mulclip_fast.train`` whose rank 0 spends longer in the final evaluation than a collective may
wait (used by test_distributed_training).

The process group's timeout is cut to ``COLLECTIVE_TIMEOUT_S`` and rank 0's evaluation sleeps
``EVAL_SLEEP_S`` first, as a large model's or a slow disk's evaluation would take longer than the real
timeout: the other ranks must not be left waiting for rank 0 in a collective that then times out.
"""

import functools
import os
import sys
import time

from mulclip_fast.train import loop, main

if __name__ == "__main__":
    loop.init_distributed = functools.partial(
        loop.init_distributed, timeout_s=float(os.environ["COLLECTIVE_TIMEOUT_S"])
    )
    if os.environ.get("RANK") == "0":
        evaluate = loop.evaluate

        def slow_evaluate(*args, **kwargs):
            time.sleep(float(os.environ["EVAL_SLEEP_S"]))
            return evaluate(*args, **kwargs)

        loop.evaluate = slow_evaluate
    sys.exit(main(sys.argv[1:]))
