//! twinvol.io/v1alpha1 API types. (to be written)
