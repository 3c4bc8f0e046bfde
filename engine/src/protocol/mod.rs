//! Replication wire protocol. (to be written)
