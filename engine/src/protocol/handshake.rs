//! The connection handshake: version check, then mutual challenge-response
//! authentication with a shared secret.
//!
//! ```text
//! both sides, at once:  Hello { magic, version, role, nonce }
//! on a version mismatch: Refused { Version, our version, peer's } and close
//! both sides:           Proof { HMAC-SHA256(secret, label, role, nonce_f, nonce_r) }
//! on a wrong proof:     Refused { Auth, .. } and close
//! replica:              Welcome
//! ```
//!
//! Both sides send their `Hello` without waiting, so each sees the other's
//! version and each refuses a mismatch itself, naming both versions (the
//! layout of `Hello` and `Refused` is frozen for that reason). Each proof
//! covers both fresh nonces and the prover's role, so a proof can be neither
//! replayed on another connection nor reflected back to its maker. Proofs are
//! compared in constant time (`Mac::verify_slice`). The secret never travels.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use super::codec::Message;
use super::io::{FrameError, FrameReader, FrameWriter};
use super::message::{Hello, NONCE_LEN, PROOF_LEN, RefusalReason, Refused, Role};
use super::types::ProtocolVersion;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion(3);

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

const PROOF_LABEL: &[u8] = b"twinvol handshake proof v1";

/// The shared secret that authenticates frontends and replicas to each other.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why the secret file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "secret file {path} holds {len} bytes (after trimming whitespace); use at least {MIN_SECRET_LEN}, e.g. `head -c 32 /dev/urandom | base64 > FILE`"
    )]
    TooShort { path: PathBuf, len: usize },
}

impl Secret {
    /// Reads the secret from `path`; surrounding whitespace (a trailing
    /// newline from `echo`) is not part of it.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let raw = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.to_owned(),
            source,
        })?;
        let trimmed = raw.trim_ascii();
        if trimmed.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort {
                path: path.to_owned(),
                len: trimmed.len(),
            });
        }
        Ok(Self(trimmed.to_vec()))
    }

    /// For tests.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }
}

/// Why a handshake failed. Each variant says which check failed and who
/// noticed it.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection failed during the handshake")]
    Frame(#[from] FrameError),
    #[error("connection failed during the handshake")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection during the handshake")]
    Closed,
    #[error(
        "protocol version mismatch: the peer speaks version {theirs}, this side speaks version {ours}; run the same twinvol version on both ends"
    )]
    VersionMismatch {
        ours: ProtocolVersion,
        theirs: ProtocolVersion,
    },
    #[error(
        "authentication failed: the peer's proof of the shared secret is wrong; the secret files differ"
    )]
    WrongSecret,
    #[error("the peer refused the connection ({reason:?}): {message}")]
    RefusedByPeer {
        reason: RefusalReason,
        peer_version: ProtocolVersion,
        message: String,
    },
    #[error("the peer sent {got} where the handshake expects {expected}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("the peer claims the same role ({0:?}) as this side")]
    SameRole(Role),
}

fn kind_name(msg: &Message) -> &'static str {
    match msg {
        Message::Hello(_) => "hello",
        Message::Refused(_) => "refused",
        Message::Proof(_) => "proof",
        Message::Welcome => "welcome",
        Message::Request(_) => "a request",
        Message::Response(_) => "a response",
    }
}

/// Runs the handshake as `role`, speaking `version` (normally
/// [`PROTOCOL_VERSION`]; tests pass another to check refusals).
pub async fn handshake<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    role: Role,
    version: ProtocolVersion,
    secret: &Secret,
) -> Result<(), HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    writer
        .send(&Message::Hello(Hello {
            version,
            role,
            nonce,
        }))
        .await?;

    let peer = match next(reader).await? {
        Message::Hello(h) => h,
        other => {
            return Err(refuse_unexpected(writer, version, "hello", &other).await);
        }
    };
    if peer.version != version {
        let err = HandshakeError::VersionMismatch {
            ours: version,
            theirs: peer.version,
        };
        refuse(writer, RefusalReason::Version, version, peer.version, &err).await;
        return Err(err);
    }
    if peer.role == role {
        let err = HandshakeError::SameRole(role);
        refuse(writer, RefusalReason::Protocol, version, peer.version, &err).await;
        return Err(err);
    }
    let (nonce_f, nonce_r) = match role {
        Role::Frontend => (nonce, peer.nonce),
        Role::Replica => (peer.nonce, nonce),
    };
    let proof = |who: Role| {
        let mut mac = secret.mac();
        mac.update(PROOF_LABEL);
        mac.update(&[match who {
            Role::Frontend => 1,
            Role::Replica => 2,
        }]);
        mac.update(&nonce_f);
        mac.update(&nonce_r);
        mac
    };
    let mine: [u8; PROOF_LEN] = proof(role).finalize().into_bytes().into();
    writer.send(&Message::Proof(mine)).await?;

    let theirs = match next(reader).await? {
        Message::Proof(p) => p,
        other => return Err(refuse_unexpected(writer, version, "proof", &other).await),
    };
    if proof(peer.role).verify_slice(&theirs).is_err() {
        let err = HandshakeError::WrongSecret;
        refuse(writer, RefusalReason::Auth, version, peer.version, &err).await;
        return Err(err);
    }
    match role {
        Role::Replica => writer.send(&Message::Welcome).await?,
        Role::Frontend => match next(reader).await? {
            Message::Welcome => {}
            other => return Err(refuse_unexpected(writer, version, "welcome", &other).await),
        },
    }
    Ok(())
}

/// Reads the next handshake message, turning a peer's refusal into an error.
async fn next<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
) -> Result<Message, HandshakeError> {
    match reader.read_message().await? {
        None => Err(HandshakeError::Closed),
        Some(Message::Refused(r)) => Err(HandshakeError::RefusedByPeer {
            reason: r.reason,
            peer_version: r.refuser_version,
            message: r.message,
        }),
        Some(m) => Ok(m),
    }
}

async fn refuse_unexpected<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    version: ProtocolVersion,
    expected: &'static str,
    got: &Message,
) -> HandshakeError {
    let err = HandshakeError::Unexpected {
        expected,
        got: kind_name(got),
    };
    refuse(
        writer,
        RefusalReason::Protocol,
        version,
        ProtocolVersion(0),
        &err,
    )
    .await;
    err
}

/// Best effort: tells the peer why before the connection is dropped.
async fn refuse<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    reason: RefusalReason,
    ours: ProtocolVersion,
    theirs: ProtocolVersion,
    err: &HandshakeError,
) {
    let msg = Message::Refused(Refused {
        reason,
        refuser_version: ours,
        peer_version: theirs,
        message: err.to_string(),
    });
    if writer.send(&msg).await.is_ok() {
        let _ = writer.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(
        f_version: ProtocolVersion,
        f_secret: &[u8],
        r_version: ProtocolVersion,
        r_secret: &[u8],
    ) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
        let (a, b) = tokio::io::duplex(4096);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let fs = Secret::from_bytes(f_secret);
        let rs = Secret::from_bytes(r_secret);
        let f = async move {
            let (mut r, mut w) = (FrameReader::new(ar), FrameWriter::new(aw));
            handshake(&mut r, &mut w, Role::Frontend, f_version, &fs).await
        };
        let r = async move {
            let (mut r, mut w) = (FrameReader::new(br), FrameWriter::new(bw));
            handshake(&mut r, &mut w, Role::Replica, r_version, &rs).await
        };
        tokio::join!(f, r)
    }

    const S: &[u8] = b"0123456789abcdef-secret";

    #[tokio::test]
    async fn same_version_and_secret_connects() {
        let (f, r) = pair(PROTOCOL_VERSION, S, PROTOCOL_VERSION, S).await;
        f.expect("frontend side");
        r.expect("replica side");
    }

    #[tokio::test]
    async fn other_version_is_refused_on_both_ends_naming_both_versions() {
        let (f, r) = pair(ProtocolVersion(99), S, PROTOCOL_VERSION, S).await;
        let f = f.expect_err("frontend refuses");
        let r = r.expect_err("replica refuses");
        let cur = PROTOCOL_VERSION.0;
        for (e, ours, theirs) in [(&f, 99, cur), (&r, cur, 99)] {
            match e {
                HandshakeError::VersionMismatch { ours: o, theirs: t } => {
                    assert_eq!((o.0, t.0), (ours, theirs));
                }
                other => panic!("unexpected {other:?}"),
            }
            let text = e.to_string();
            assert!(
                text.contains("version 99") && text.contains(&format!("version {cur}")),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_on_both_ends() {
        let (f, r) = pair(
            PROTOCOL_VERSION,
            S,
            PROTOCOL_VERSION,
            b"another-secret-of-16+",
        )
        .await;
        assert!(matches!(f, Err(HandshakeError::WrongSecret)), "{f:?}");
        assert!(matches!(r, Err(HandshakeError::WrongSecret)), "{r:?}");
    }

    #[test]
    fn short_secret_file_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s");
        std::fs::write(&p, "short\n").expect("write");
        let e = Secret::from_file(&p).expect_err("too short");
        assert!(e.to_string().contains(&p.display().to_string()));
    }
}
