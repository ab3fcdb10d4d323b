"""`python -m stages.report`: see __init__.py."""

import sys

from stages.report.stage import main

if __name__ == "__main__":
    sys.exit(main())
