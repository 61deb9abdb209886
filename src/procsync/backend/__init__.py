"""The way to the server: the Lua script registry, the client connection, and the
embedded server launcher (:mod:`procsync.backend.binary`, :mod:`procsync.backend.embedded`).

Nothing here knows about primitives; the layers above call into it.
"""
