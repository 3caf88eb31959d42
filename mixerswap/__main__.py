"""``python -m mixerswap ...`` (and ``accelerate launch -m mixerswap distill ...``)."""

from .cli import main

main()
