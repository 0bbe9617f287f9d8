import sys

from optrush.cli.main import main

sys.exit(main())
