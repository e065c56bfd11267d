import sys

from sifoverlay.cli import main

sys.exit(main())
