"""The built-in handlers, named in routes by the keys of
:data:`streamsvc.handlers.BUILTIN_HANDLERS`."""
