import sys

from ondemand.worker.main import main

sys.exit(main())
