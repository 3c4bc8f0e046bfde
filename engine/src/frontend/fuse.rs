//! FUSE export: the volume as one file, for `losetup --direct-io=on`. (to be written)
