"""The old path of `clip_us.echocare.swin`, kept so that users' imports keep working:
importing it gives that very module."""
import sys

from .echocare import swin

sys.modules[__name__] = swin
