"""The old path of `clip_us.baselines.clipseg`, kept so that users' imports keep working:
importing it gives that very module."""
import sys

from .baselines import clipseg

sys.modules[__name__] = clipseg
