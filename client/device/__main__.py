import sys

from client.device.cli import main

sys.exit(main())
