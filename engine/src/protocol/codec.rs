//! Encoding and decoding of protocol frames: the only place that knows the
//! byte layout.
//!
//! A frame is `len: u32 LE | crc: u32 LE | body[len]` where `crc` is the
//! CRC32C of `body` and `body[0]` is the message kind. All integers are
//! little-endian. The length is checked against [`MAX_FRAME_BODY`] before
//! any buffer is grown, so a hostile or corrupt length costs nothing.
//!
//! Frozen across versions (so that any two versions can refuse each other
//! clearly): the frame header, kind `0x01` (`Hello`: magic, version, role,
//! nonce) and kind `0x02` (`Refused`: reason, both versions, message).
//!
//! Write data and read data are the tail of their frame: decoding slices
//! them out of the frame's `Bytes` without copying, and encoding hands them
//! back separately ([`encode_split`]) so that the writer can send them
//! without copying them into a frame buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::message::{
    ByteRange, Hello, MAX_IN_SYNC, MAX_RANGES, NONCE_LEN, Op, PROOF_LEN, RefusalReason, Refused,
    Reply, Request, Response, ResyncReport, Role, Session, SyncClaim, SyncView, WireError,
};
use super::types::{
    ArbiterVersion, Epoch, ProtocolVersion, RecordStamp, ReplicaId, RequestId, SessionGen,
    SessionKind, VolumeId,
};

/// Magic at the start of every `Hello`.
pub const HELLO_MAGIC: [u8; 8] = *b"TWINVOL\0";
/// Bytes of frame header (length and checksum).
pub const FRAME_HEADER_LEN: usize = 8;
/// Largest read or write carried by one request.
pub const MAX_IO_BYTES: u32 = 4 << 20;
/// Largest frame body accepted: one maximal I/O plus its fixed fields.
pub const MAX_FRAME_BODY: u32 = MAX_IO_BYTES + 256;
/// Longest error or refusal message put on the wire; longer ones are cut.
const MAX_MESSAGE_LEN: usize = 1024;

const K_HELLO: u8 = 0x01;
const K_REFUSED: u8 = 0x02;
const K_PROOF: u8 = 0x03;
const K_WELCOME: u8 = 0x04;
const K_OPEN: u8 = 0x10;
const K_READ: u8 = 0x11;
const K_WRITE: u8 = 0x12;
const K_FLUSH: u8 = 0x13;
const K_TRIM: u8 = 0x14;
const K_WRITE_ZEROES: u8 = 0x15;
const K_PEER_STATE: u8 = 0x16;
const K_RESYNC_STATUS: u8 = 0x17;
const K_ACTIVE_EXTENTS: u8 = 0x18;
const K_MARK_DIRTY: u8 = 0x19;
const K_FORGET_ACTIVITY: u8 = 0x1a;
const K_FENCE_SESSIONS: u8 = 0x1b;
// 0x26 and 0x27: requests of the durability work (0x20-0x25 are replies).
const K_RECOVERED_EXTENTS: u8 = 0x26;
const K_FORGET_EXTENTS: u8 = 0x27;
// 0x30-0x33: volume expansion.
const K_RESIZE: u8 = 0x30;
const K_OPENED: u8 = 0x20;
const K_DATA: u8 = 0x21;
const K_DONE: u8 = 0x22;
const K_ERROR: u8 = 0x23;
const K_RESYNC: u8 = 0x24;
const K_EXTENTS: u8 = 0x25;

const FLAG_FUA: u8 = 1;
const FLAG_MIRRORED: u8 = 2;

/// Every message that can travel in a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Refused(Refused),
    Proof([u8; PROOF_LEN]),
    Welcome,
    Request(Request),
    Response(Response),
}

/// Why bytes could not be decoded into a frame or a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: u32, max: u32 },
    #[error("frame checksum mismatch: header says {expected:#010x}, body has {actual:#010x}")]
    BadChecksum { expected: u32, actual: u32 },
    #[error("empty frame body")]
    Empty,
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("message kind {kind:#04x} is truncated")]
    Truncated { kind: u8 },
    #[error("message kind {kind:#04x} has {extra} unexpected trailing bytes")]
    Trailing { kind: u8, extra: usize },
    #[error("hello has a bad magic: this peer does not speak the twinvol protocol")]
    BadMagic,
    #[error("invalid field {field} in message kind {kind:#04x}: {reason}")]
    Invalid {
        kind: u8,
        field: &'static str,
        reason: String,
    },
}

/// Encodes `msg` as a whole frame appended to `out`.
pub fn encode(msg: &Message, out: &mut BytesMut) {
    if let Some(tail) = encode_split(msg, out) {
        out.extend_from_slice(&tail);
    }
}

/// Encodes `msg` as a frame whose header and fixed fields are appended to
/// `head`; bulk data (write or read payload), if any, is returned instead of
/// copied and must be sent right after `head`. The checksum covers both.
pub fn encode_split(msg: &Message, head: &mut BytesMut) -> Option<Bytes> {
    let start = head.len();
    head.put_u64_le(0); // header placeholder
    let tail = put_body(msg, head);
    let fixed = &head[start + FRAME_HEADER_LEN..];
    let mut crc = crc32c::crc32c(fixed);
    let mut len = fixed.len();
    if let Some(t) = &tail {
        crc = crc32c::crc32c_append(crc, t);
        len += t.len();
    }
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    head[start..start + 4].copy_from_slice(&len.to_le_bytes());
    head[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    tail
}

fn put_body(msg: &Message, b: &mut BytesMut) -> Option<Bytes> {
    match msg {
        Message::Hello(h) => {
            b.put_u8(K_HELLO);
            b.put_slice(&HELLO_MAGIC);
            b.put_u32_le(h.version.0);
            b.put_u8(match h.role {
                Role::Frontend => 1,
                Role::Replica => 2,
            });
            b.put_slice(&h.nonce);
            None
        }
        Message::Refused(r) => {
            b.put_u8(K_REFUSED);
            b.put_u8(match r.reason {
                RefusalReason::Version => 1,
                RefusalReason::Auth => 2,
                RefusalReason::Protocol => 3,
            });
            b.put_u32_le(r.refuser_version.0);
            b.put_u32_le(r.peer_version.0);
            put_str16(b, &r.message);
            None
        }
        Message::Proof(p) => {
            b.put_u8(K_PROOF);
            b.put_slice(p);
            None
        }
        Message::Welcome => {
            b.put_u8(K_WELCOME);
            None
        }
        Message::Request(r) => put_request(r, b),
        Message::Response(r) => put_response(r, b),
    }
}

fn put_request(r: &Request, b: &mut BytesMut) -> Option<Bytes> {
    let kind = match r.op {
        Op::Open { .. } => K_OPEN,
        Op::Read { .. } => K_READ,
        Op::Write { .. } => K_WRITE,
        Op::Flush => K_FLUSH,
        Op::Trim { .. } => K_TRIM,
        Op::WriteZeroes { .. } => K_WRITE_ZEROES,
        Op::PeerState { .. } => K_PEER_STATE,
        Op::ResyncStatus => K_RESYNC_STATUS,
        Op::ActiveExtents => K_ACTIVE_EXTENTS,
        Op::MarkDirty { .. } => K_MARK_DIRTY,
        Op::ForgetActivity => K_FORGET_ACTIVITY,
        Op::FenceSessions { .. } => K_FENCE_SESSIONS,
        Op::RecoveredExtents => K_RECOVERED_EXTENTS,
        Op::ForgetExtents { .. } => K_FORGET_EXTENTS,
        Op::Resize { .. } => K_RESIZE,
    };
    b.put_u8(kind);
    b.put_u64_le(r.id.0);
    b.put_u64_le(r.epoch.0);
    match &r.op {
        Op::Open {
            volume,
            expected_size,
            session,
            claim,
        } => {
            put_str8(b, volume.as_str());
            put_opt_u64(b, *expected_size);
            put_session_kind(b, session.kind);
            b.put_u64_le(session.generation.0);
            match claim {
                Some(c) => {
                    b.put_u8(1);
                    put_str8(b, c.source.as_str());
                    put_str8(b, c.target.as_str());
                    put_view(b, &c.view);
                }
                None => b.put_u8(0),
            }
            None
        }
        Op::Read { offset, len } => {
            b.put_u64_le(*offset);
            b.put_u32_le(*len);
            None
        }
        Op::Trim {
            offset,
            len,
            mirrored,
        } => {
            b.put_u64_le(*offset);
            b.put_u32_le(*len);
            b.put_u8(flags(false, *mirrored));
            None
        }
        Op::Write {
            offset,
            fua,
            mirrored,
            data,
        } => {
            b.put_u64_le(*offset);
            b.put_u8(flags(*fua, *mirrored));
            Some(data.clone())
        }
        Op::Flush => None,
        Op::WriteZeroes {
            offset,
            len,
            fua,
            mirrored,
        } => {
            b.put_u64_le(*offset);
            b.put_u32_le(*len);
            b.put_u8(flags(*fua, *mirrored));
            None
        }
        Op::PeerState {
            you,
            peer,
            view,
            peer_incarnation,
            fence,
        } => {
            put_str8(b, you.as_str());
            put_str8(b, peer.as_str());
            put_view(b, view);
            b.put_u64_le(*peer_incarnation);
            put_opt_u64(b, fence.map(|g| g.0));
            None
        }
        Op::FenceSessions { kind, below } => {
            put_session_kind(b, *kind);
            b.put_u64_le(below.0);
            None
        }
        Op::ResyncStatus | Op::ActiveExtents | Op::ForgetActivity | Op::RecoveredExtents => None,
        Op::MarkDirty { ranges } | Op::ForgetExtents { ranges } => {
            put_ranges(b, ranges);
            None
        }
        Op::Resize { size } => {
            b.put_u64_le(*size);
            None
        }
    }
}

fn put_opt_u64(b: &mut BytesMut, v: Option<u64>) {
    match v {
        Some(v) => {
            b.put_u8(1);
            b.put_u64_le(v);
        }
        None => b.put_u8(0),
    }
}

fn put_session_kind(b: &mut BytesMut, kind: SessionKind) {
    b.put_u8(match kind {
        SessionKind::Frontend => 1,
        SessionKind::Resync => 2,
    });
}

/// `epoch u64 | seq u64 | arbiter version (str8) | n u8 | n ids (str8)`.
fn put_view(b: &mut BytesMut, v: &SyncView) {
    b.put_u64_le(v.epoch.0);
    b.put_u64_le(v.seq);
    // At most 255 bytes (checked by its constructor).
    put_str8(b, v.arbiter_version.as_str());
    // At most MAX_IN_SYNC are sent (callers build views of two replicas);
    // the decoder refuses more.
    let n = v.in_sync.len().min(MAX_IN_SYNC);
    b.put_u8(n as u8);
    for id in &v.in_sync[..n] {
        put_str8(b, id.as_str());
    }
}

fn put_stamp(b: &mut BytesMut, s: RecordStamp) {
    b.put_u64_le(s.epoch.0);
    b.put_u64_le(s.seq);
}

fn flags(fua: bool, mirrored: bool) -> u8 {
    (if fua { FLAG_FUA } else { 0 }) | (if mirrored { FLAG_MIRRORED } else { 0 })
}

fn put_ranges(b: &mut BytesMut, ranges: &[ByteRange]) {
    // At most MAX_RANGES are sent (callers split); the decoder refuses more.
    let n = ranges.len().min(MAX_RANGES);
    b.put_u32_le(n as u32);
    for r in &ranges[..n] {
        b.put_u64_le(r.offset);
        b.put_u64_le(r.len);
    }
}

fn put_response(r: &Response, b: &mut BytesMut) -> Option<Bytes> {
    match &r.result {
        Ok(Reply::Opened {
            size,
            epoch,
            incarnation,
        }) => {
            b.put_u8(K_OPENED);
            b.put_u64_le(r.id.0);
            b.put_u64_le(*size);
            b.put_u64_le(epoch.0);
            b.put_u64_le(*incarnation);
            None
        }
        Ok(Reply::Data(data)) => {
            b.put_u8(K_DATA);
            b.put_u64_le(r.id.0);
            Some(data.clone())
        }
        Ok(Reply::Done) => {
            b.put_u8(K_DONE);
            b.put_u64_le(r.id.0);
            None
        }
        Ok(Reply::Resync(rep)) => {
            b.put_u8(K_RESYNC);
            b.put_u64_le(r.id.0);
            match &rep.tracking {
                Some(p) => {
                    b.put_u8(1);
                    put_str8(b, p.as_str());
                }
                None => b.put_u8(0),
            }
            b.put_u64_le(rep.dirty_bytes);
            b.put_u64_le(rep.copied_bytes);
            None
        }
        Ok(Reply::Extents(ranges)) => {
            b.put_u8(K_EXTENTS);
            b.put_u64_le(r.id.0);
            put_ranges(b, ranges);
            None
        }
        Err(e) => {
            b.put_u8(K_ERROR);
            b.put_u64_le(r.id.0);
            put_wire_error(e, b);
            None
        }
    }
}

fn put_wire_error(e: &WireError, b: &mut BytesMut) {
    match e {
        WireError::StaleEpoch { seen, current } => {
            b.put_u8(1);
            b.put_u64_le(seen.0);
            b.put_u64_le(current.0);
        }
        WireError::EpochNotOpened { seen, current } => {
            b.put_u8(2);
            b.put_u64_le(seen.0);
            b.put_u64_le(current.0);
        }
        WireError::OutOfRange { offset, len, size } => {
            b.put_u8(3);
            b.put_u64_le(*offset);
            b.put_u64_le(*len);
            b.put_u64_le(*size);
        }
        WireError::SizeMismatch { expected, actual } => {
            b.put_u8(4);
            b.put_u64_le(*expected);
            b.put_u64_le(*actual);
        }
        WireError::NoSuchVolume { volume } => {
            b.put_u8(5);
            put_str8(b, volume.as_str());
        }
        WireError::NotOpen => b.put_u8(6),
        WireError::AlreadyOpen => b.put_u8(7),
        WireError::TooLarge { len, max } => {
            b.put_u8(8);
            b.put_u64_le(*len);
            b.put_u64_le(*max);
        }
        WireError::Io { message } => {
            b.put_u8(9);
            put_str16(b, message);
        }
        WireError::NotTracking => b.put_u8(10),
        WireError::StaleSession { kind, seen, floor } => {
            b.put_u8(11);
            put_session_kind(b, *kind);
            b.put_u64_le(seen.0);
            b.put_u64_le(floor.0);
        }
        WireError::StaleView { seen, current } => {
            b.put_u8(12);
            put_stamp(b, *seen);
            put_stamp(b, *current);
        }
        WireError::NotSource { known, reason } => {
            b.put_u8(13);
            put_view(b, known);
            put_str16(b, reason);
        }
        WireError::VolumeFailed { reason } => {
            b.put_u8(ERR_VOLUME_FAILED);
            put_str16(b, reason);
        }
        WireError::ResizeRefused {
            current,
            requested,
            reason,
        } => {
            b.put_u8(ERR_RESIZE_REFUSED);
            b.put_u64_le(*current);
            b.put_u64_le(*requested);
            put_str16(b, reason);
        }
    }
}

/// The error code of [`WireError::VolumeFailed`] (in the range 0x20–0x27
/// the durability work owns, so that codes added in parallel do not clash).
const ERR_VOLUME_FAILED: u8 = 0x20;
/// The error code of [`WireError::ResizeRefused`] (0x30–0x33: expansion's).
const ERR_RESIZE_REFUSED: u8 = 0x30;

fn put_str8(b: &mut BytesMut, s: &str) {
    // Ids are at most 63 bytes (checked by their constructors).
    let s = truncate_utf8(s, usize::from(u8::MAX));
    b.put_u8(s.len() as u8);
    b.put_slice(s.as_bytes());
}

fn put_str16(b: &mut BytesMut, s: &str) {
    let s = truncate_utf8(s, MAX_MESSAGE_LEN);
    b.put_u16_le(s.len() as u16);
    b.put_slice(s.as_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Takes one complete frame off the front of `buf` and returns its
/// checksum-verified body, or `None` if `buf` does not hold a whole frame
/// yet. Checks the length before the caller grows `buf` for the rest.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<Bytes>, DecodeError> {
    let Some(len) = peek_frame_len(buf)? else {
        return Ok(None);
    };
    let total = FRAME_HEADER_LEN + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    let expected = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
    frame.advance(FRAME_HEADER_LEN);
    let actual = crc32c::crc32c(&frame);
    if actual != expected {
        return Err(DecodeError::BadChecksum { expected, actual });
    }
    Ok(Some(frame.freeze()))
}

/// The body length announced by a frame header at the front of `buf`,
/// checked against the maximum.
pub fn peek_frame_len(buf: &[u8]) -> Result<Option<u32>, DecodeError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len > MAX_FRAME_BODY {
        return Err(DecodeError::FrameTooLarge {
            len,
            max: MAX_FRAME_BODY,
        });
    }
    Ok(Some(len))
}

/// Decodes one whole frame from the front of `bytes` (copying it): the
/// message and the number of bytes consumed, or `None` if incomplete.
/// Convenient for tests and the fuzz target; connections use
/// [`take_frame`] and [`decode_body`].
pub fn decode_frame(bytes: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    let Some(len) = peek_frame_len(bytes)? else {
        return Ok(None);
    };
    let total = FRAME_HEADER_LEN + len as usize;
    if bytes.len() < total {
        return Ok(None);
    }
    let mut buf = BytesMut::from(&bytes[..total]);
    match take_frame(&mut buf)? {
        Some(body) => Ok(Some((decode_body(body)?, total))),
        None => Ok(None),
    }
}

/// Decodes a checksum-verified frame body into a message. Bulk data is
/// sliced out of `body` without copying.
pub fn decode_body(body: Bytes) -> Result<Message, DecodeError> {
    let Some(&kind) = body.first() else {
        return Err(DecodeError::Empty);
    };
    let mut r = Rd {
        kind,
        buf: body.slice(1..),
    };
    let msg = match kind {
        K_HELLO => {
            let magic: [u8; 8] = r.array()?;
            if magic != HELLO_MAGIC {
                return Err(DecodeError::BadMagic);
            }
            let version = ProtocolVersion(r.u32()?);
            let role = match r.u8()? {
                1 => Role::Frontend,
                2 => Role::Replica,
                other => return Err(r.invalid("role", format!("unknown role {other}"))),
            };
            let nonce: [u8; NONCE_LEN] = r.array()?;
            Message::Hello(Hello {
                version,
                role,
                nonce,
            })
        }
        K_REFUSED => {
            let reason = match r.u8()? {
                1 => RefusalReason::Version,
                2 => RefusalReason::Auth,
                3 => RefusalReason::Protocol,
                other => return Err(r.invalid("reason", format!("unknown reason {other}"))),
            };
            let refuser_version = ProtocolVersion(r.u32()?);
            let peer_version = ProtocolVersion(r.u32()?);
            let message = r.str16()?;
            Message::Refused(Refused {
                reason,
                refuser_version,
                peer_version,
                message,
            })
        }
        K_PROOF => Message::Proof(r.array()?),
        K_WELCOME => Message::Welcome,
        K_OPEN | K_READ | K_WRITE | K_FLUSH | K_TRIM | K_WRITE_ZEROES | K_PEER_STATE
        | K_RESYNC_STATUS | K_ACTIVE_EXTENTS | K_MARK_DIRTY | K_FORGET_ACTIVITY
        | K_FENCE_SESSIONS | K_RECOVERED_EXTENTS | K_FORGET_EXTENTS | K_RESIZE => {
            let id = RequestId(r.u64()?);
            let epoch = Epoch(r.u64()?);
            let op = match kind {
                K_OPEN => {
                    let volume = r.volume()?;
                    let expected_size = r.opt_u64("expected_size")?;
                    let session = Session {
                        kind: r.session_kind()?,
                        generation: SessionGen(r.u64()?),
                    };
                    let claim = match r.u8()? {
                        0 => None,
                        1 => Some(SyncClaim {
                            source: r.replica()?,
                            target: r.replica()?,
                            view: r.view()?,
                        }),
                        other => return Err(r.invalid("claim", format!("bad tag {other}"))),
                    };
                    Op::Open {
                        volume,
                        expected_size,
                        session,
                        claim,
                    }
                }
                K_READ => Op::Read {
                    offset: r.u64()?,
                    len: r.u32()?,
                },
                K_WRITE => {
                    let offset = r.u64()?;
                    let (fua, mirrored) = r.flags()?;
                    Op::Write {
                        offset,
                        fua,
                        mirrored,
                        data: r.rest(),
                    }
                }
                K_FLUSH => Op::Flush,
                K_TRIM => {
                    let (offset, len) = (r.u64()?, r.u32()?);
                    match r.flags()? {
                        (false, mirrored) => Op::Trim {
                            offset,
                            len,
                            mirrored,
                        },
                        (true, _) => {
                            return Err(r.invalid("flags", "FUA on a trim".to_owned()));
                        }
                    }
                }
                K_PEER_STATE => Op::PeerState {
                    you: r.replica()?,
                    peer: r.replica()?,
                    view: r.view()?,
                    peer_incarnation: r.u64()?,
                    fence: r.opt_u64("fence")?.map(SessionGen),
                },
                K_FENCE_SESSIONS => Op::FenceSessions {
                    kind: r.session_kind()?,
                    below: SessionGen(r.u64()?),
                },
                K_RESYNC_STATUS => Op::ResyncStatus,
                K_ACTIVE_EXTENTS => Op::ActiveExtents,
                K_FORGET_ACTIVITY => Op::ForgetActivity,
                K_MARK_DIRTY => Op::MarkDirty {
                    ranges: r.ranges()?,
                },
                K_RECOVERED_EXTENTS => Op::RecoveredExtents,
                K_FORGET_EXTENTS => Op::ForgetExtents {
                    ranges: r.ranges()?,
                },
                K_RESIZE => Op::Resize { size: r.u64()? },
                _ => {
                    let (offset, len) = (r.u64()?, r.u32()?);
                    let (fua, mirrored) = r.flags()?;
                    Op::WriteZeroes {
                        offset,
                        len,
                        fua,
                        mirrored,
                    }
                }
            };
            Message::Request(Request { id, epoch, op })
        }
        K_OPENED | K_DATA | K_DONE | K_ERROR | K_RESYNC | K_EXTENTS => {
            let id = RequestId(r.u64()?);
            let result = match kind {
                K_OPENED => Ok(Reply::Opened {
                    size: r.u64()?,
                    epoch: Epoch(r.u64()?),
                    incarnation: r.u64()?,
                }),
                K_DATA => Ok(Reply::Data(r.rest())),
                K_DONE => Ok(Reply::Done),
                K_RESYNC => {
                    let tracking = match r.u8()? {
                        0 => None,
                        1 => Some(r.replica()?),
                        other => return Err(r.invalid("tracking", format!("bad tag {other}"))),
                    };
                    Ok(Reply::Resync(ResyncReport {
                        tracking,
                        dirty_bytes: r.u64()?,
                        copied_bytes: r.u64()?,
                    }))
                }
                K_EXTENTS => Ok(Reply::Extents(r.ranges()?)),
                _ => Err(r.wire_error()?),
            };
            Message::Response(Response { id, result })
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::Trailing {
            kind,
            extra: r.buf.len(),
        });
    }
    Ok(msg)
}

/// A bounds-checked cursor over a frame body.
struct Rd {
    kind: u8,
    buf: Bytes,
}

impl Rd {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            Err(DecodeError::Truncated { kind: self.kind })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_u64_le())
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.need(N)?;
        let mut a = [0u8; N];
        self.buf.copy_to_slice(&mut a);
        Ok(a)
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
    /// `(fua, mirrored)`.
    fn flags(&mut self) -> Result<(bool, bool), DecodeError> {
        let f = self.u8()?;
        if f & !(FLAG_FUA | FLAG_MIRRORED) != 0 {
            return Err(self.invalid("flags", format!("unknown flags {f:#04x}")));
        }
        Ok((f & FLAG_FUA != 0, f & FLAG_MIRRORED != 0))
    }
    fn string(&mut self, n: usize, field: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.invalid(field, "not UTF-8".into()))
    }
    fn str16(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        if n > MAX_MESSAGE_LEN {
            return Err(self.invalid("message", format!("{n} bytes is over {MAX_MESSAGE_LEN}")));
        }
        self.string(n, "message")
    }
    fn volume(&mut self) -> Result<VolumeId, DecodeError> {
        let n = self.u8()? as usize;
        let s = self.string(n, "volume")?;
        VolumeId::new(s).map_err(|e| self.invalid("volume", e.to_string()))
    }
    fn replica(&mut self) -> Result<ReplicaId, DecodeError> {
        let n = self.u8()? as usize;
        let s = self.string(n, "peer")?;
        ReplicaId::new(s).map_err(|e| self.invalid("peer", e.to_string()))
    }
    fn arbiter_version(&mut self) -> Result<ArbiterVersion, DecodeError> {
        let n = self.u8()? as usize;
        let s = self.string(n, "arbiter_version")?;
        ArbiterVersion::new(s).map_err(|e| self.invalid("arbiter_version", e.to_string()))
    }
    fn opt_u64(&mut self, field: &'static str) -> Result<Option<u64>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            other => Err(self.invalid(field, format!("bad tag {other}"))),
        }
    }
    fn session_kind(&mut self) -> Result<SessionKind, DecodeError> {
        match self.u8()? {
            1 => Ok(SessionKind::Frontend),
            2 => Ok(SessionKind::Resync),
            other => Err(self.invalid("session kind", format!("unknown kind {other}"))),
        }
    }
    fn stamp(&mut self) -> Result<RecordStamp, DecodeError> {
        Ok(RecordStamp {
            epoch: Epoch(self.u64()?),
            seq: self.u64()?,
        })
    }
    fn view(&mut self) -> Result<SyncView, DecodeError> {
        let epoch = Epoch(self.u64()?);
        let seq = self.u64()?;
        let arbiter_version = self.arbiter_version()?;
        let n = self.u8()? as usize;
        if n > MAX_IN_SYNC {
            return Err(self.invalid("in_sync", format!("{n} replicas, more than {MAX_IN_SYNC}")));
        }
        let mut in_sync = Vec::with_capacity(n);
        for _ in 0..n {
            in_sync.push(self.replica()?);
        }
        Ok(SyncView {
            epoch,
            seq,
            arbiter_version,
            in_sync,
        })
    }
    fn invalid(&self, field: &'static str, reason: String) -> DecodeError {
        DecodeError::Invalid {
            kind: self.kind,
            field,
            reason,
        }
    }
    fn ranges(&mut self) -> Result<Vec<ByteRange>, DecodeError> {
        let n = self.u32()? as usize;
        if n > MAX_RANGES {
            return Err(self.invalid("ranges", format!("{n} ranges, more than {MAX_RANGES}")));
        }
        self.need(n * 16)?;
        Ok((0..n)
            .map(|_| ByteRange {
                offset: self.buf.get_u64_le(),
                len: self.buf.get_u64_le(),
            })
            .collect())
    }
    fn wire_error(&mut self) -> Result<WireError, DecodeError> {
        Ok(match self.u8()? {
            1 => WireError::StaleEpoch {
                seen: Epoch(self.u64()?),
                current: Epoch(self.u64()?),
            },
            2 => WireError::EpochNotOpened {
                seen: Epoch(self.u64()?),
                current: Epoch(self.u64()?),
            },
            3 => WireError::OutOfRange {
                offset: self.u64()?,
                len: self.u64()?,
                size: self.u64()?,
            },
            4 => WireError::SizeMismatch {
                expected: self.u64()?,
                actual: self.u64()?,
            },
            5 => WireError::NoSuchVolume {
                volume: self.volume()?,
            },
            6 => WireError::NotOpen,
            7 => WireError::AlreadyOpen,
            8 => WireError::TooLarge {
                len: self.u64()?,
                max: self.u64()?,
            },
            9 => WireError::Io {
                message: self.str16()?,
            },
            10 => WireError::NotTracking,
            11 => WireError::StaleSession {
                kind: self.session_kind()?,
                seen: SessionGen(self.u64()?),
                floor: SessionGen(self.u64()?),
            },
            12 => WireError::StaleView {
                seen: self.stamp()?,
                current: self.stamp()?,
            },
            13 => WireError::NotSource {
                known: self.view()?,
                reason: self.str16()?,
            },
            ERR_VOLUME_FAILED => WireError::VolumeFailed {
                reason: self.str16()?,
            },
            ERR_RESIZE_REFUSED => WireError::ResizeRefused {
                current: self.u64()?,
                requested: self.u64()?,
                reason: self.str16()?,
            },
            other => return Err(self.invalid("error", format!("unknown error code {other}"))),
        })
    }
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
