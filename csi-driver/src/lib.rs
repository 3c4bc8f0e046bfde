//! The CSI driver: identity, controller and node services, and the node
//! plugin's data path (replica server and frontend from `twinvol-engine`).
//!
//! Not built yet: the CSI work follows the engine issues. This crate exists
//! so that the workspace has the shape of the design from the start; it
//! exports nothing.
