import sys

from redrafter.cli import main

sys.exit(main())
