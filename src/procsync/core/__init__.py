"""I/O-free logic of each primitive.

Every operation is a generator that yields :mod:`~procsync.core.steps` ("run this
script", "pop from this inbox for up to t seconds") and receives their results.
A blocking driver and an asyncio driver (:mod:`procsync._drivers`) execute the
steps, so each primitive's algorithm — scripts, deadlines, retries, reply
decoding, clean-up on interruption — is written once.
"""
