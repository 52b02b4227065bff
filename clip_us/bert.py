"""The old path of `clip_us.echocare.bert`, kept so that users' imports keep working:
importing it gives that very module."""
import sys

from .echocare import bert

sys.modules[__name__] = bert
