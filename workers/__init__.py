"""The chunk writers: separate processes that move spooled bytes into upload data.

`pool.WriterPool` is the front end's handle on them, `writer` is the process itself and `messages`
is the protocol between the two.
"""
