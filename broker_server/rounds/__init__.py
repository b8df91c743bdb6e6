"""Round logic without I/O: events in, commands out (``events``); the synchronous rounds' controller
and a round's aggregation (``sync``); the buffered asynchronous versions' controller and its jobs,
arrivals and buffer (``buffered``)."""
