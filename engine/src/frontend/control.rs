//! The frontend's control socket (`--control-socket PATH`): a unix socket
//! on which a local client — `twinvol-engine resize`, the CSI node plugin's
//! NodeExpandVolume — asks a running frontend to grow its volume.
//!
//! One request per connection, one line each way:
//!
//! ```text
//! → resize <bytes>          ← ok <bytes>            (the size afterwards)
//! → size                    ← ok <bytes>
//!                           ← error invalid <why>   (shrink, bad size: do not retry)
//!                           ← error failed <why>    (a replica failed: retry)
//! ```
//!
//! `ok` comes once every in-sync replica has grown durably
//! ([`Mirror::resize`]) and the exports show the new size (the FUSE
//! file's size is refreshed in the kernel, so `losetup -c` sees it; NBD
//! clients that connect from then on get the new size).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::backend::BlockBackend;
use super::fuse::SizeNotifier;
use super::mirror::Mirror;

/// Longest request line accepted.
const MAX_LINE: usize = 256;
/// How long a client waits for the answer (a resize of a slow replica).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors of the control socket, on either end.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on the control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the frontend's control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: no answer within {CLIENT_TIMEOUT:?}")]
    TimedOut { path: PathBuf },
    #[error("control socket {path}: unexpected answer {answer:?}")]
    BadAnswer { path: PathBuf, answer: String },
    /// The frontend refused: `invalid` when asking again cannot help
    /// (shrinking, a bad size).
    #[error("the frontend refused: {message}")]
    Refused { invalid: bool, message: String },
}

/// Serves the control socket at `path` (replacing a stale one) until the
/// task is dropped. `fuse`, if the volume is exported as a FUSE file, is
/// told about every growth.
pub async fn serve(
    path: PathBuf,
    mirror: Arc<Mirror>,
    fuse: Option<SizeNotifier>,
) -> Result<(), ControlError> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| ControlError::Bind {
        path: path.clone(),
        source,
    })?;
    tracing::info!(socket = %path.display(), "control socket listening");
    loop {
        let (stream, _) = listener.accept().await.map_err(|source| ControlError::Io {
            path: path.clone(),
            source,
        })?;
        let (mirror, fuse) = (mirror.clone(), fuse.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &mirror, fuse.as_ref()).await {
                tracing::warn!(error = %e, "control connection failed");
            }
        });
    }
}

async fn answer(
    stream: UnixStream,
    mirror: &Mirror,
    fuse: Option<&SizeNotifier>,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(rd).take(MAX_LINE as u64);
    rd.read_line(&mut line).await?;
    let reply = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["size"] => format!("ok {}", mirror.size()),
        ["resize", bytes] => match bytes.parse::<u64>() {
            Err(_) => format!("error invalid not a size in bytes: {bytes:?}"),
            Ok(size) => resize(mirror, fuse, size).await,
        },
        _ => format!("error invalid unknown request {:?}", line.trim()),
    };
    wr.write_all(format!("{reply}\n").as_bytes()).await?;
    wr.shutdown().await
}

async fn resize(mirror: &Mirror, fuse: Option<&SizeNotifier>, size: u64) -> String {
    match mirror.resize(size).await {
        Err(e) => {
            let kind = if e.is_invalid() { "invalid" } else { "failed" };
            format!("error {kind} {}", crate::error_chain(&e).replace('\n', " "))
        }
        Ok(size) => {
            if let Some(fuse) = fuse.cloned() {
                match tokio::task::spawn_blocking(move || fuse.size_changed()).await {
                    Ok(Ok(seen)) if seen == size => {}
                    Ok(Ok(seen)) => {
                        tracing::warn!(size, seen, "the FUSE file does not show the new size yet")
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot refresh the FUSE file's size")
                    }
                    Err(e) => tracing::warn!(error = %e, "FUSE size refresh task failed"),
                }
            }
            tracing::info!(size, "resize answered");
            format!("ok {size}")
        }
    }
}

/// Sends one request line to the control socket at `path` and returns the
/// size in its `ok` answer.
async fn request(path: &Path, line: &str) -> Result<u64, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let exchange = async {
        let mut stream =
            UnixStream::connect(path)
                .await
                .map_err(|source| ControlError::Connect {
                    path: path.to_owned(),
                    source,
                })?;
        stream
            .write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(io)?;
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .await
            .map_err(io)?;
        Ok::<_, ControlError>(answer)
    };
    let answer = tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| ControlError::TimedOut {
            path: path.to_owned(),
        })??;
    let answer = answer.trim();
    let bad = || ControlError::BadAnswer {
        path: path.to_owned(),
        answer: answer.to_owned(),
    };
    if let Some(size) = answer.strip_prefix("ok ") {
        return size.parse().map_err(|_| bad());
    }
    if let Some(message) = answer.strip_prefix("error invalid ") {
        return Err(ControlError::Refused {
            invalid: true,
            message: message.to_owned(),
        });
    }
    if let Some(message) = answer.strip_prefix("error failed ") {
        return Err(ControlError::Refused {
            invalid: false,
            message: message.to_owned(),
        });
    }
    Err(bad())
}

/// Asks the frontend behind `path` to grow its volume to `size` bytes;
/// returns the size afterwards.
pub async fn request_resize(path: &Path, size: u64) -> Result<u64, ControlError> {
    request(path, &format!("resize {size}")).await
}

/// Asks the frontend behind `path` for its volume's size.
pub async fn request_size(path: &Path) -> Result<u64, ControlError> {
    request(path, "size").await
}
