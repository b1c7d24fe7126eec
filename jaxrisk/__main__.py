"""`python -m jaxrisk` is the `jaxrisk` command."""

import sys

from jaxrisk.cli import main

sys.exit(main())
