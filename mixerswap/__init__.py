"""mixerswap."""
