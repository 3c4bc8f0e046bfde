//! The mirror: connections to the two replicas; writes go to both. (to be written)
