"""``python -m mulclip_fast.train`` in which rank 1 cannot read its data (used by test_distributed_training).

Rank 1 fails after joining the process group, as a rank with an unreadable shard would; rank 0 is then
waiting in a collective, and the job must end with rank 1's message instead of hanging.
"""

import os
import sys

from mulclip_fast.data import DataError
from mulclip_fast.train import loop, main

if __name__ == "__main__":
    if os.environ.get("RANK") == "1":

        def unreadable(*args, **kwargs):
            raise DataError("shard unreadable on rank 1 (injected by the test)")

        loop.open_dataset = unreadable
    sys.exit(main(sys.argv[1:]))
