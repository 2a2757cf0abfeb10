import sys

from runtime_harness.cli import main

sys.exit(main())
