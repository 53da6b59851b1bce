"""Memory sizes the settings (flux/settings.py) and the memory plan (flux/memory.py) share."""

GiB = 1024**3
HOST_RESERVE_BYTES = 8 * GiB  # of the machine's RAM, for everything but weights: the process, pinned buffers, files
