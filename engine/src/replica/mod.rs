//! Replica server. (to be written)
