import sys

from bitplan.cli import main

sys.exit(main())
