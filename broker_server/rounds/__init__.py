"""Round logic without I/O: the bookkeeping of synchronous rounds and buffered asynchronous versions."""
