import sys

from pymig.faults.runner import main

sys.exit(main())
