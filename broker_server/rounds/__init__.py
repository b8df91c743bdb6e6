"""Round logic without I/O: events in, commands out (``events``); the synchronous rounds' controller
(``sync``) and a round's rule composed of wrappers, with its carry (``aggregation``); the buffered
asynchronous versions' controller and its jobs, arrivals and buffer (``buffered``)."""
