"""python -m clip_us.captions template|fit|refine ..."""
from .templates import main

main()
