"""The transports: thin shells that carry stream connections to the call core.

* :mod:`.websockets_transport` (``transport = "websockets"``, the default): websockets'
  asyncio server, a task per connection;
* :mod:`.picows_transport` (``transport = "picows"``): picows' C frame parser calling back
  per frame, timers instead of tasks.

Both read each connection's first request with the server's HTTP front, admit handshakes
through :meth:`~streamsvc.server.StreamServer.admit`, and run every stream through
:class:`~streamsvc.core.CallCore`. Neither imports the other.
"""
