"""``python -m mulclip_fast.train`` whose save of one checkpoint hangs half-written (used by test_faults).

``KILL_IN_SAVE_OF=NAME``: the save of the checkpoint file ``NAME`` writes part of its temporary, prints
``in save`` and waits, so that the test can kill -9 the run in the middle of that save.
"""

import os
import sys
import time

import torch

from mulclip_fast.train import main

if __name__ == "__main__":
    real_save = torch.save

    def save(obj, path):
        if os.path.basename(str(path)).startswith(os.environ["KILL_IN_SAVE_OF"] + ".tmp."):
            with open(path, "wb") as handle:
                handle.write(b"\0" * 100_000)
            print("in save", flush=True)
            time.sleep(600)
        real_save(obj, path)

    torch.save = save
    sys.exit(main(sys.argv[1:]))
