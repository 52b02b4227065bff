"""The old path of `clip_us.evaluation.probe`, kept so that users' imports keep working:
importing it gives that very module."""
import sys

from .evaluation import probe

sys.modules[__name__] = probe
