//! NBD export: the volume behind a [`BlockBackend`] served to NBD clients
//! (the kernel client, qemu, libnbd's tools, fio) over a unix socket or TCP.
//!
//! Owns the listening sockets and the life of each connection. The protocol
//! is split the way it runs: [`wire`] encodes and decodes every frame (pure,
//! property-tested), [`handshake`] negotiates the export (fixed newstyle,
//! `NBD_OPT_GO`/`INFO`/`EXPORT_NAME`/`LIST`/`ABORT`), and [`transmission`]
//! runs the request loop: many requests in flight per connection, executed
//! concurrently, their replies written by one writer.
//!
//! One export per server: whatever name a client asks for, it gets the
//! volume (there is exactly one behind every frontend).
//!
//! Serving runs until the future is dropped (the task aborted); dropping it
//! aborts every connection it spawned and removes the unix socket file.

pub mod handshake;
#[cfg(test)]
mod tests;
pub mod transmission;
pub mod wire;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;

use super::backend::BlockBackend;

/// Largest data payload of one request (READ reply or WRITE), advertised in
/// `NBD_INFO_BLOCK_SIZE`; bigger requests are refused with `EINVAL`.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Numbers the connections of this process, so that the log lines of one
/// connection can be told from another's on the same socket.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Why serving stopped (listening errors; a failing connection only ends
/// itself and is logged).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot remove the stale NBD socket {path}: {source}")]
    RemoveStaleSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen for NBD clients on unix socket {path}: {source}")]
    BindUnix {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen for NBD clients on {addr}: {source}")]
    BindTcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("accepting an NBD client on {listener} failed: {source}")]
    Accept {
        listener: String,
        source: std::io::Error,
    },
}

/// Why one client connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    ClientFlags(#[from] wire::ClientFlagsError),
    #[error(transparent)]
    OptionMagic(#[from] wire::BadOptionMagic),
    #[error(transparent)]
    RequestMagic(#[from] wire::BadRequestMagic),
    #[error("client sent option {option} with {len} bytes of data, more than the {max} allowed")]
    OptionTooLong { option: u32, len: u32, max: u32 },
    #[error("client sent a {len}-byte write, more than the {max}-byte maximum payload")]
    PayloadTooLong { len: u32, max: u32 },
}

/// How a connection ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client aborted negotiation (or hung up during it).
    Negotiation,
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the socket between requests.
    Eof,
}

/// Serves the volume on a unix socket at `path`, replacing a stale socket
/// file left by a previous run, until the future is dropped.
pub async fn serve_unix<B: BlockBackend>(path: &Path, backend: Arc<B>) -> Result<(), NbdError> {
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path).map_err(|source| NbdError::BindUnix {
        path: path.to_path_buf(),
        source,
    })?;
    let _remove_on_exit = SocketFileGuard(path.to_path_buf());
    tracing::info!(socket = %path.display(), size = backend.size(), "serving NBD on unix socket");
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted.map_err(|source| NbdError::Accept {
                    listener: path.display().to_string(),
                    source,
                })?;
                let pid = stream.peer_cred().ok().and_then(|c| c.pid());
                let (r, w) = stream.into_split();
                let peer = Peer::Unix { path: path.to_path_buf(), pid };
                connections.spawn(serve_connection(r, w, backend.clone(), peer));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Serves the volume on TCP `addr` until the future is dropped.
pub async fn serve_tcp<B: BlockBackend>(addr: SocketAddr, backend: Arc<B>) -> Result<(), NbdError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| NbdError::BindTcp { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(%local, size = backend.size(), "serving NBD on TCP");
    serve_tcp_listener(listener, backend).await
}

/// Serves the volume on an already bound TCP listener (lets callers bind
/// port 0 and learn the port first).
pub async fn serve_tcp_listener<B: BlockBackend>(
    listener: TcpListener,
    backend: Arc<B>,
) -> Result<(), NbdError> {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = accepted.map_err(|source| NbdError::Accept {
                    listener: listener
                        .local_addr()
                        .map_or_else(|_| "tcp".to_string(), |a| a.to_string()),
                    source,
                })?;
                // Small replies (write acks) must not wait for Nagle.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::warn!(%peer, error = %e, "cannot set TCP_NODELAY on NBD connection");
                }
                let (r, w) = stream.into_split();
                connections.spawn(serve_connection(r, w, backend.clone(), Peer::Tcp(peer)));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Who is on the other end of a connection, for its log lines.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A client on the unix socket at `path`, with its process id.
    Unix {
        path: PathBuf,
        pid: Option<i32>,
    },
    Tcp(SocketAddr),
    /// In-memory streams (tests).
    Other(&'static str),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix {
                path,
                pid: Some(pid),
            } => write!(f, "unix:{} pid {pid}", path.display()),
            Peer::Unix { path, pid: None } => write!(f, "unix:{}", path.display()),
            Peer::Tcp(addr) => write!(f, "tcp:{addr}"),
            Peer::Other(name) => f.write_str(name),
        }
    }
}

/// Runs one client connection from handshake to disconnect and logs how it
/// went (one line when it starts, one when it ends).
pub async fn serve_connection<R, W, B>(mut reader: R, mut writer: W, backend: Arc<B>, peer: Peer)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    B: BlockBackend,
{
    let conn = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    tracing::info!(conn, %peer, "NBD client connected");
    let result = match handshake::negotiate(&mut reader, &mut writer, backend.size()).await {
        Ok(handshake::Outcome::Transmit) => transmission::run(reader, writer, backend).await,
        Ok(handshake::Outcome::Abort) => Ok(transmission::Summary::negotiation_only()),
        Err(e) => Err(e),
    };
    match result {
        Ok(s) => tracing::info!(
            conn,
            %peer,
            ending = ?s.ending,
            requests = s.requests,
            errors = s.errors,
            bytes_read = s.bytes_read,
            bytes_written = s.bytes_written,
            "NBD client disconnected"
        ),
        Err(e) => tracing::warn!(conn, %peer, error = %e, "NBD connection failed"),
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), NbdError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| NbdError::RemoveStaleSocket {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(NbdError::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(_) => Ok(()),
    }
}

/// Removes the socket file when serving stops, so that clients get
/// "no such file" rather than "connection refused" from a dead frontend.
struct SocketFileGuard(PathBuf);

impl Drop for SocketFileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
