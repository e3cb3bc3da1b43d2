"""`python -m fastvae ...` is the same as the `fastvae` command."""

import sys

from .cli import main

sys.exit(main())
