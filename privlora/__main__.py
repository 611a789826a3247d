import sys

from privlora.commands.cli import main

sys.exit(main())
