"""A stage-kind plugin that never finishes importing: a node given it must start without it, and say so."""

import time

time.sleep(3600)
