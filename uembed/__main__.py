import sys

from uembed.cli import main

sys.exit(main())
