import sys

from pied.cli import main

sys.exit(main())
