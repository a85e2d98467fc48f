"""`python -m faultproxy.testing.origin --host 127.0.0.1 --port 8000`."""

import sys

from .routes import main

sys.exit(main())
