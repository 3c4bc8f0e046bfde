//! NBD negotiation: from the server's greeting to the start of transmission.
//!
//! Fixed newstyle only (every client that matters speaks it; old and plain
//! newstyle clients cannot be told about errors). Options handled: `GO`,
//! `INFO`, `EXPORT_NAME`, `LIST`, `ABORT`; every other option is consumed and
//! answered `NBD_REP_ERR_UNSUP` (structured replies, TLS and metadata
//! contexts are not offered: simple replies only). Option data is bounded so
//! that a client cannot make the server buffer more than a few KiB.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::wire::{self, InfoRequest};
use super::{ConnectionError, MAX_PAYLOAD};

/// Largest option data kept in memory (export names are at most 4 KiB).
const MAX_OPTION_DATA: u32 = 16 * 1024;
/// Largest option data read and thrown away before answering TOO_BIG; above
/// this the connection is closed instead of reading on.
const MAX_OPTION_DISCARD: u32 = 1024 * 1024;

/// The transmission flags of every export: flush and FUA are honoured by the
/// backend, trim and write-zeroes are passed on, and because a backend flush
/// covers every write completed before it on any connection, clients may
/// spread I/O over several connections.
pub const TRANSMISSION_FLAGS: u16 = wire::TFLAG_HAS_FLAGS
    | wire::TFLAG_SEND_FLUSH
    | wire::TFLAG_SEND_FUA
    | wire::TFLAG_SEND_TRIM
    | wire::TFLAG_SEND_WRITE_ZEROES
    | wire::TFLAG_CAN_MULTI_CONN;

/// Preferred I/O size advertised to clients.
const PREFERRED_BLOCK: u32 = 4096;

/// What the negotiation decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Enter the transmission phase.
    Transmit,
    /// The client ended the negotiation (ABORT, or hung up between options).
    Abort,
}

/// Runs the negotiation on a fresh connection.
pub async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    size: u64,
) -> Result<Outcome, ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    wire::encode_greeting(&mut out);
    writer.write_all(&out).await?;
    writer.flush().await?;

    let client = wire::decode_client_flags(reader.read_u32().await?)?;
    let mut data = Vec::new();
    loop {
        let mut raw = [0u8; wire::OPTION_HEADER_LEN];
        match reader.read_exact(&mut raw).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Abort),
            Err(e) => return Err(e.into()),
        }
        let header = wire::decode_option_header(&raw)?;
        out.clear();
        if header.len > MAX_OPTION_DATA {
            if header.option == wire::OPT_EXPORT_NAME || header.len > MAX_OPTION_DISCARD {
                return Err(ConnectionError::OptionTooLong {
                    option: header.option,
                    len: header.len,
                    max: MAX_OPTION_DATA,
                });
            }
            discard(reader, u64::from(header.len)).await?;
            wire::encode_option_reply(&mut out, header.option, wire::REP_ERR_TOO_BIG, b"");
            send(writer, &out).await?;
            continue;
        }
        data.resize(header.len as usize, 0);
        reader.read_exact(&mut data).await?;
        match header.option {
            wire::OPT_EXPORT_NAME => {
                wire::encode_export_name_reply(
                    &mut out,
                    size,
                    TRANSMISSION_FLAGS,
                    client.no_zeroes,
                );
                send(writer, &out).await?;
                return Ok(Outcome::Transmit);
            }
            wire::OPT_ABORT => {
                wire::encode_option_reply(&mut out, header.option, wire::REP_ACK, b"");
                // The client may already have closed its end; the answer is a courtesy.
                let _ = send(writer, &out).await;
                return Ok(Outcome::Abort);
            }
            wire::OPT_LIST => {
                if data.is_empty() {
                    wire::encode_rep_server(&mut out, b"");
                    wire::encode_option_reply(&mut out, header.option, wire::REP_ACK, b"");
                } else {
                    wire::encode_option_reply(&mut out, header.option, wire::REP_ERR_INVALID, b"");
                }
                send(writer, &out).await?;
            }
            wire::OPT_INFO | wire::OPT_GO => match wire::decode_info_request(&data) {
                Ok(request) => {
                    encode_info_replies(&mut out, header.option, &request, size);
                    send(writer, &out).await?;
                    if header.option == wire::OPT_GO {
                        return Ok(Outcome::Transmit);
                    }
                }
                Err(_) => {
                    wire::encode_option_reply(&mut out, header.option, wire::REP_ERR_INVALID, b"");
                    send(writer, &out).await?;
                }
            },
            other => {
                wire::encode_option_reply(&mut out, other, wire::REP_ERR_UNSUP, b"");
                send(writer, &out).await?;
            }
        }
    }
}

/// The replies to a valid INFO/GO: the export's size and flags, its block
/// sizes if asked for, then ACK.
fn encode_info_replies(out: &mut Vec<u8>, option: u32, request: &InfoRequest<'_>, size: u64) {
    wire::encode_info_export(out, option, size, TRANSMISSION_FLAGS);
    if request.wants(wire::INFO_BLOCK_SIZE) {
        wire::encode_info_block_size(out, option, 1, PREFERRED_BLOCK, MAX_PAYLOAD);
    }
    wire::encode_option_reply(out, option, wire::REP_ACK, b"");
}

async fn send<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}

/// Reads and drops `len` bytes.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, len: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
