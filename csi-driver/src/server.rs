//! Serving gRPC on a unix socket: the CSI endpoint and the kubelet
//! registration socket.
//!
//! A stale socket file from a previous run is removed before binding (the
//! path is ours alone); the socket is created under a restrictive umask
//! (0077) and only root, which kubelet and the sidecars run as, can connect.

use std::future::Future;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::error::{CsiError, CsiResult};

/// The socket path of an endpoint written `unix:///path` or `/path`.
pub fn socket_path(endpoint: &str) -> CsiResult<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(CsiError::invalid(
            "endpoint",
            endpoint,
            "give an absolute unix socket path, as unix:///path/csi.sock",
        ));
    }
    Ok(PathBuf::from(path))
}

/// Binds a unix socket at `path`, replacing a stale one.
pub fn bind(path: &Path) -> CsiResult<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| CsiError::io("creating directory", dir, e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(CsiError::io("removing the stale socket", path, e)),
    }
    // SAFETY: umask only changes this process's file-creation mask; it is
    // restored right after the bind.
    let old = unsafe { libc::umask(0o077) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    listener.map_err(|e| CsiError::io("binding", path, e))
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> CsiResult<()> {
    router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| CsiError::Internal {
            detail: format!("the gRPC server failed: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_unix_paths() {
        assert_eq!(
            socket_path("unix:///run/csi/csi.sock").expect("valid"),
            PathBuf::from("/run/csi/csi.sock")
        );
        assert_eq!(
            socket_path("/run/csi.sock").expect("valid"),
            PathBuf::from("/run/csi.sock")
        );
        assert!(socket_path("unix://relative.sock").is_err());
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_the_new_one_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sub/csi.sock");
        drop(bind(&path).expect("first bind"));
        let _second = bind(&path).expect("a stale socket does not block the next start");
        let mode = std::fs::metadata(&path)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
    }
}
