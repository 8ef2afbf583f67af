"""``python -m lora_ckpt`` runs the CLI."""

import sys

from .cli import main

sys.exit(main())
