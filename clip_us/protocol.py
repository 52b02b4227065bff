"""The old path of `clip_us.evaluation.protocol`, kept so that users' imports keep working:
importing it gives that very module."""
import sys

from .evaluation import protocol

sys.modules[__name__] = protocol
