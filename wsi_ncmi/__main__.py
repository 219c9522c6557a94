"""`python -m wsi_ncmi` is the same as the `wsi-ncmi` console script (and what torchrun launches)."""

import sys

from wsi_ncmi.cli import main

sys.exit(main())
