import sys

from client.device.device_cli import main

sys.exit(main())
