import sys

from curvtrain.launcher.cli import main

sys.exit(main())
