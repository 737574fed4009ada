"""``python -m trainer.tracking replay <spool> [--uri URI]`` (see :mod:`trainer.tracking.replay`)."""
import sys

from trainer.tracking.replay import main

if __name__ == "__main__":
    sys.exit(main())
