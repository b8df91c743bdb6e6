"""Round logic without I/O; so far the bookkeeping of buffered asynchronous versions (``buffered``)."""
