//! Storage access trait. (to be written)
