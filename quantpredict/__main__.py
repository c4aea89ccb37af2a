import sys

from quantpredict.cli import main

sys.exit(main())
