"""The transports: thin shells that carry stream connections to the call core.

* :mod:`.picows_transport` (``transport = "picows"``, what the default ``auto`` picks when
  picows is installed, as it is by default): picows' C frame parser calling back per
  frame, timers instead of tasks;
* :mod:`.websockets_transport` (``transport = "websockets"``): websockets' asyncio
  server, a task per connection.

Both read each connection's first request with the server's HTTP front, admit handshakes
through :meth:`~streamsvc.server.StreamServer.admit`, and run every stream through
:class:`~streamsvc.server.call.CallCore`. Neither imports the other.
"""
