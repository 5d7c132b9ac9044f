import sys

from beyond_icon.cli import main

sys.exit(main())
