"""The old path of `clip_us.baselines.backbones`, kept so that users' imports keep working:
importing it gives that very module."""
import sys

from .baselines import backbones

sys.modules[__name__] = backbones
