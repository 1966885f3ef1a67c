"""``python -m dist_infonce.sweep``: the grid runner, :mod:`dist_infonce.trainer.sweep`."""

import sys

from dist_infonce.trainer.sweep import main

if __name__ == "__main__":
    sys.exit(main())
