"""``python -m helpers.data check PATH``: see :mod:`helpers.data.check`."""
import sys

from helpers.data.check import main

sys.exit(main())
