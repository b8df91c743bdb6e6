"""Round logic without I/O: a synchronous round's aggregation (``sync``) and the bookkeeping of
buffered asynchronous versions (``buffered``)."""
