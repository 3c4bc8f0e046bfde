//! NBD export (newstyle fixed handshake) over a unix socket or TCP. (to be written)
