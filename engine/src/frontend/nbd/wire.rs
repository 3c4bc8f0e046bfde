//! The NBD wire format, and nothing else: constants, and encoding/decoding
//! of every frame the server reads or writes (handshake, options, option
//! replies, transmission requests and simple replies).
//!
//! Everything here is pure (bytes in, values out) so that the decoders can be
//! property-tested on arbitrary input and the I/O code never touches a magic
//! number. Big-endian throughout, as the protocol says. Decoders take exactly
//! the fixed-size header they need; variable-length parts (option data, write
//! payloads) are read by the caller once the header says how long they are and
//! the caller has checked that length against its limits.

use bytes::{Buf, BufMut};

/// "NBDMAGIC": the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation magic, also prefixing every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server → client, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server, 32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option types.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Information types in `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Length of the server's opening: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option header: IHAVEOPT, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless NO_ZEROES.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Error values of a simple reply (NBD's own numbering, which matches
/// Linux errno values but is defined by the protocol, not the platform).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdErrno {
    Eperm = 1,
    Eio = 5,
    Enomem = 12,
    Einval = 22,
    Enospc = 28,
    Eoverflow = 75,
    Enotsup = 95,
    Eshutdown = 108,
}

/// The server's opening bytes.
pub fn encode_greeting(out: &mut impl BufMut) {
    out.put_u64(NBDMAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

/// What the client wants after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub no_zeroes: bool,
}

/// Why the client's flags are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientFlagsError {
    #[error("client does not speak the fixed newstyle handshake (flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("client sent unknown handshake flags {0:#x}")]
    Unknown(u32),
}

/// Decodes the client's 32-bit flags.
pub fn decode_client_flags(raw: u32) -> Result<ClientFlags, ClientFlagsError> {
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if raw & !known != 0 {
        return Err(ClientFlagsError::Unknown(raw));
    }
    if raw & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ClientFlagsError::NotFixedNewstyle(raw));
    }
    Ok(ClientFlags {
        no_zeroes: raw & FLAG_C_NO_ZEROES != 0,
    })
}

/// The fixed part of an option sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// The option header did not start with IHAVEOPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("option does not start with IHAVEOPT (got {0:#018x})")]
pub struct BadOptionMagic(pub u64);

/// Decodes an option header from exactly [`OPTION_HEADER_LEN`] bytes.
pub fn decode_option_header(raw: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, BadOptionMagic> {
    let mut raw: &[u8] = raw;
    let magic = raw.get_u64();
    if magic != IHAVEOPT {
        return Err(BadOptionMagic(magic));
    }
    Ok(OptionHeader {
        option: raw.get_u32(),
        len: raw.get_u32(),
    })
}

/// Encodes the header of an option reply; `len` bytes of data follow.
pub fn encode_option_reply_header(out: &mut impl BufMut, option: u32, reply: u32, len: u32) {
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(len);
}

/// Encodes an option reply with its data.
pub fn encode_option_reply(out: &mut impl BufMut, option: u32, reply: u32, data: &[u8]) {
    // Option data is bounded by the caller's option limits, far below 4 GiB.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    encode_option_reply_header(out, option, reply, len);
    out.put_slice(data);
}

/// Encodes `NBD_REP_SERVER` for `NBD_OPT_LIST`: one export name.
pub fn encode_rep_server(out: &mut impl BufMut, name: &[u8]) {
    let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX);
    encode_option_reply_header(out, OPT_LIST, REP_SERVER, 4 + name_len);
    out.put_u32(name_len);
    out.put_slice(name);
}

/// Encodes `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(out: &mut impl BufMut, option: u32, size: u64, flags: u16) {
    encode_option_reply_header(out, option, REP_INFO, 12);
    out.put_u16(INFO_EXPORT);
    out.put_u64(size);
    out.put_u16(flags);
}

/// Encodes `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(
    out: &mut impl BufMut,
    option: u32,
    minimum: u32,
    preferred: u32,
    maximum: u32,
) {
    encode_option_reply_header(out, option, REP_INFO, 14);
    out.put_u16(INFO_BLOCK_SIZE);
    out.put_u32(minimum);
    out.put_u32(preferred);
    out.put_u32(maximum);
}

/// Encodes the reply to `NBD_OPT_EXPORT_NAME` (no option-reply framing).
pub fn encode_export_name_reply(out: &mut impl BufMut, size: u64, flags: u16, no_zeroes: bool) {
    out.put_u64(size);
    out.put_u16(flags);
    if !no_zeroes {
        out.put_bytes(0, EXPORT_NAME_PADDING);
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a [u8],
    /// The information types the client asked for (raw big-endian u16s).
    pub requests: &'a [u8],
}

impl InfoRequest<'_> {
    /// Whether the client asked for this information type.
    pub fn wants(&self, info: u16) -> bool {
        self.requests
            .chunks_exact(2)
            .any(|c| u16::from_be_bytes([c[0], c[1]]) == info)
    }
}

/// The option data of `NBD_OPT_INFO`/`NBD_OPT_GO` is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed NBD_OPT_INFO/GO data ({len} bytes)")]
pub struct BadInfoRequest {
    pub len: usize,
}

/// Decodes the data of `NBD_OPT_INFO` / `NBD_OPT_GO`: u32 name length, name,
/// u16 count, count × u16. The lengths must add up exactly.
pub fn decode_info_request(data: &[u8]) -> Result<InfoRequest<'_>, BadInfoRequest> {
    let bad = BadInfoRequest { len: data.len() };
    let (name_len, rest) = data.split_first_chunk::<4>().ok_or(bad)?;
    let name_len = usize::try_from(u32::from_be_bytes(*name_len)).map_err(|_| bad)?;
    if rest.len() < name_len {
        return Err(bad);
    }
    let (name, rest) = rest.split_at(name_len);
    let (count, requests) = rest.split_first_chunk::<2>().ok_or(bad)?;
    let count = usize::from(u16::from_be_bytes(*count));
    if requests.len() != count * 2 {
        return Err(bad);
    }
    Ok(InfoRequest { name, requests })
}

/// The command of a transmission request, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    /// A command type this server does not implement.
    Other(u16),
}

impl Command {
    fn from_raw(raw: u16) -> Self {
        match raw {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            other => Command::Other(other),
        }
    }
}

/// A transmission request header. `handle` is the client's opaque cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

/// The request header did not start with the request magic: the stream is
/// out of step and the connection must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request does not start with the NBD request magic (got {0:#010x})")]
pub struct BadRequestMagic(pub u32);

/// Decodes a request header from exactly [`REQUEST_LEN`] bytes.
pub fn decode_request(raw: &[u8; REQUEST_LEN]) -> Result<Request, BadRequestMagic> {
    let mut raw: &[u8] = raw;
    let magic = raw.get_u32();
    if magic != REQUEST_MAGIC {
        return Err(BadRequestMagic(magic));
    }
    let flags = raw.get_u16();
    let command = Command::from_raw(raw.get_u16());
    Ok(Request {
        flags,
        command,
        handle: raw.get_u64(),
        offset: raw.get_u64(),
        len: raw.get_u32(),
    })
}

/// Encodes a request header (the server never sends one; tests and the
/// property tests use it to build valid traffic).
pub fn encode_request(
    out: &mut impl BufMut,
    flags: u16,
    command: u16,
    handle: u64,
    offset: u64,
    len: u32,
) {
    out.put_u32(REQUEST_MAGIC);
    out.put_u16(flags);
    out.put_u16(command);
    out.put_u64(handle);
    out.put_u64(offset);
    out.put_u32(len);
}

/// Encodes a simple reply header (0 = success); read data follows it.
pub fn encode_simple_reply(out: &mut impl BufMut, error: Option<NbdErrno>, handle: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error.map_or(0, |e| e as u32));
    out.put_u64(handle);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_flags() {
        let mut out = Vec::new();
        encode_greeting(&mut out);
        assert_eq!(out.len(), GREETING_LEN);
        assert_eq!(&out[..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(&out[16..], &[0, 3]);
    }

    #[test]
    fn client_without_fixed_newstyle_is_refused() {
        assert_eq!(
            decode_client_flags(0),
            Err(ClientFlagsError::NotFixedNewstyle(0))
        );
        assert_eq!(decode_client_flags(4), Err(ClientFlagsError::Unknown(4)));
        assert_eq!(decode_client_flags(3), Ok(ClientFlags { no_zeroes: true }));
    }

    #[test]
    fn info_request_lengths_must_add_up() {
        let mut data = Vec::new();
        data.extend_from_slice(&3u32.to_be_bytes());
        data.extend_from_slice(b"vol");
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let req = decode_info_request(&data).expect("valid");
        assert_eq!(req.name, b"vol");
        assert!(req.wants(INFO_BLOCK_SIZE));
        assert!(!req.wants(INFO_EXPORT));
        data.push(0);
        assert!(decode_info_request(&data).is_err());
        assert!(decode_info_request(&data[..5]).is_err());
    }

    proptest! {
        #[test]
        fn request_round_trips(flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) {
            let mut out = Vec::new();
            encode_request(&mut out, flags, cmd, handle, offset, len);
            let raw: [u8; REQUEST_LEN] = out.try_into().expect("fixed size");
            let req = decode_request(&raw).expect("magic");
            prop_assert_eq!(req.flags, flags);
            prop_assert_eq!(req.command, Command::from_raw(cmd));
            prop_assert_eq!(req.handle, handle);
            prop_assert_eq!(req.offset, offset);
            prop_assert_eq!(req.len, len);
        }

        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_info_request(&bytes);
            if let Some(raw) = bytes.first_chunk::<REQUEST_LEN>() {
                let _ = decode_request(raw);
            }
            if let Some(raw) = bytes.first_chunk::<OPTION_HEADER_LEN>() {
                let _ = decode_option_header(raw);
            }
        }
    }
}
