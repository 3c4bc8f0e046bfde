//! Property tests of the codec: every message round-trips, and arbitrary
//! bytes never panic the decoder.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::protocol::ArbiterVersionTooLong;

fn volume_id() -> impl Strategy<Value = VolumeId> {
    "[a-z0-9][a-z0-9._-]{0,62}".prop_map(|s| VolumeId::new(s).expect("strategy yields valid ids"))
}

fn replica_id() -> impl Strategy<Value = ReplicaId> {
    "[a-z0-9][a-z0-9._-]{0,62}".prop_map(|s| ReplicaId::new(s).expect("strategy yields valid ids"))
}

fn session_kind() -> impl Strategy<Value = SessionKind> {
    prop_oneof![Just(SessionKind::Frontend), Just(SessionKind::Resync)]
}

fn view() -> impl Strategy<Value = SyncView> {
    (
        any::<u64>(),
        any::<u64>(),
        "\\PC{0,60}",
        proptest::collection::vec(replica_id(), 0..=MAX_IN_SYNC),
    )
        .prop_map(|(epoch, seq, v, in_sync)| SyncView {
            epoch: Epoch(epoch),
            seq,
            arbiter_version: ArbiterVersion::new(v).expect("short strings are valid"),
            in_sync,
        })
}

fn stamp() -> impl Strategy<Value = RecordStamp> {
    (any::<u64>(), any::<u64>()).prop_map(|(e, seq)| RecordStamp {
        epoch: Epoch(e),
        seq,
    })
}

fn data() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Bytes::from)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            volume_id(),
            proptest::option::of(any::<u64>()),
            session_kind(),
            any::<u64>(),
            proptest::option::of((replica_id(), replica_id(), view())),
        )
            .prop_map(|(volume, expected_size, kind, generation, claim)| {
                Op::Open {
                    volume,
                    expected_size,
                    session: Session {
                        kind,
                        generation: SessionGen(generation),
                    },
                    claim: claim.map(|(source, target, view)| SyncClaim {
                        source,
                        target,
                        view,
                    }),
                }
            }),
        (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| Op::Read { offset, len }),
        (any::<u64>(), any::<bool>(), any::<bool>(), data()).prop_map(
            |(offset, fua, mirrored, data)| Op::Write {
                offset,
                fua,
                mirrored,
                data
            }
        ),
        Just(Op::Flush),
        (any::<u64>(), any::<u32>(), any::<bool>()).prop_map(|(offset, len, mirrored)| Op::Trim {
            offset,
            len,
            mirrored
        }),
        (any::<u64>(), any::<u32>(), any::<bool>(), any::<bool>()).prop_map(
            |(offset, len, fua, mirrored)| Op::WriteZeroes {
                offset,
                len,
                fua,
                mirrored
            }
        ),
        (
            replica_id(),
            replica_id(),
            view(),
            any::<u64>(),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(you, peer, view, peer_incarnation, fence)| Op::PeerState {
                you,
                peer,
                view,
                peer_incarnation,
                fence: fence.map(SessionGen),
            }),
        (session_kind(), any::<u64>()).prop_map(|(kind, below)| Op::FenceSessions {
            kind,
            below: SessionGen(below)
        }),
        Just(Op::ResyncStatus),
        Just(Op::ActiveExtents),
        Just(Op::ForgetActivity),
        ranges().prop_map(|ranges| Op::MarkDirty { ranges }),
        Just(Op::RecoveredExtents),
        ranges().prop_map(|ranges| Op::ForgetExtents { ranges }),
        any::<u64>().prop_map(|size| Op::Resize { size }),
    ]
}

fn ranges() -> impl Strategy<Value = Vec<ByteRange>> {
    proptest::collection::vec(
        (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| ByteRange { offset, len }),
        0..40,
    )
}

fn wire_error() -> impl Strategy<Value = WireError> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(s, c)| WireError::StaleEpoch {
            seen: Epoch(s),
            current: Epoch(c)
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(s, c)| WireError::EpochNotOpened {
            seen: Epoch(s),
            current: Epoch(c)
        }),
        (any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(offset, len, size)| WireError::OutOfRange { offset, len, size }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(expected, actual)| WireError::SizeMismatch { expected, actual }),
        volume_id().prop_map(|volume| WireError::NoSuchVolume { volume }),
        Just(WireError::NotOpen),
        Just(WireError::AlreadyOpen),
        (any::<u64>(), any::<u64>()).prop_map(|(len, max)| WireError::TooLarge { len, max }),
        "\\PC{0,200}".prop_map(|message| WireError::Io { message }),
        Just(WireError::NotTracking),
        "\\PC{0,200}".prop_map(|reason| WireError::VolumeFailed { reason }),
        (any::<u64>(), any::<u64>(), "\\PC{0,200}").prop_map(|(current, requested, reason)| {
            WireError::ResizeRefused {
                current,
                requested,
                reason,
            }
        }),
        (session_kind(), any::<u64>(), any::<u64>()).prop_map(|(kind, s, f)| {
            WireError::StaleSession {
                kind,
                seen: SessionGen(s),
                floor: SessionGen(f),
            }
        }),
        (stamp(), stamp()).prop_map(|(seen, current)| WireError::StaleView { seen, current }),
        (view(), "\\PC{0,200}").prop_map(|(known, reason)| WireError::NotSource { known, reason }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u32>(), any::<bool>(), any::<[u8; 32]>()).prop_map(|(v, f, nonce)| {
            Message::Hello(Hello {
                version: ProtocolVersion(v),
                role: if f { Role::Frontend } else { Role::Replica },
                nonce,
            })
        }),
        (0u8..3, any::<u32>(), any::<u32>(), "\\PC{0,200}").prop_map(|(r, a, b, message)| {
            Message::Refused(Refused {
                reason: [
                    RefusalReason::Version,
                    RefusalReason::Auth,
                    RefusalReason::Protocol,
                ][r as usize],
                refuser_version: ProtocolVersion(a),
                peer_version: ProtocolVersion(b),
                message,
            })
        }),
        any::<[u8; 32]>().prop_map(Message::Proof),
        Just(Message::Welcome),
        (any::<u64>(), any::<u64>(), op()).prop_map(|(id, epoch, op)| {
            Message::Request(Request {
                id: RequestId(id),
                epoch: Epoch(epoch),
                op,
            })
        }),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(id, size, e, incarnation)| {
                Message::Response(Response {
                    id: RequestId(id),
                    result: Ok(Reply::Opened {
                        size,
                        epoch: Epoch(e),
                        incarnation,
                    }),
                })
            }
        ),
        (any::<u64>(), data()).prop_map(|(id, d)| Message::Response(Response {
            id: RequestId(id),
            result: Ok(Reply::Data(d)),
        })),
        any::<u64>().prop_map(|id| Message::Response(Response {
            id: RequestId(id),
            result: Ok(Reply::Done),
        })),
        (
            any::<u64>(),
            proptest::option::of(replica_id()),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(id, tracking, dirty_bytes, copied_bytes)| {
                Message::Response(Response {
                    id: RequestId(id),
                    result: Ok(Reply::Resync(ResyncReport {
                        tracking,
                        dirty_bytes,
                        copied_bytes,
                    })),
                })
            }),
        (any::<u64>(), ranges()).prop_map(|(id, r)| Message::Response(Response {
            id: RequestId(id),
            result: Ok(Reply::Extents(r)),
        })),
        (any::<u64>(), wire_error()).prop_map(|(id, e)| Message::Response(Response {
            id: RequestId(id),
            result: Err(e),
        })),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(msg in message()) {
        let mut buf = BytesMut::new();
        encode(&msg, &mut buf);
        let (decoded, used) = decode_frame(&buf).expect("decodes").expect("complete");
        prop_assert_eq!(used, buf.len());
        prop_assert_eq!(decoded, msg);
    }

    #[test]
    fn split_encoding_equals_whole_encoding(msg in message()) {
        let mut whole = BytesMut::new();
        encode(&msg, &mut whole);
        let mut head = BytesMut::new();
        let tail = encode_split(&msg, &mut head);
        if let Some(t) = tail {
            head.extend_from_slice(&t);
        }
        prop_assert_eq!(whole, head);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(&bytes);
        let _ = decode_body(Bytes::from(bytes.clone()));
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(body)) = take_frame(&mut buf) {
            let _ = decode_body(body);
        }
    }

    #[test]
    fn any_single_bit_flip_is_caught_by_the_checksum(msg in message(), bit in any::<usize>()) {
        let mut buf = BytesMut::new();
        encode(&msg, &mut buf);
        let body_bits = (buf.len() - FRAME_HEADER_LEN) * 8;
        prop_assume!(body_bits > 0);
        let bit = bit % body_bits;
        buf[FRAME_HEADER_LEN + bit / 8] ^= 1 << (bit % 8);
        prop_assert!(
            matches!(decode_frame(&buf), Err(DecodeError::BadChecksum { .. })),
            "expected a checksum error"
        );
    }
}

#[test]
fn oversized_length_is_rejected_before_the_body_arrives() {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&(MAX_FRAME_BODY + 1).to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    let cap_before = buf.capacity();
    assert_eq!(
        take_frame(&mut buf),
        Err(DecodeError::FrameTooLarge {
            len: MAX_FRAME_BODY + 1,
            max: MAX_FRAME_BODY
        })
    );
    assert_eq!(buf.capacity(), cap_before, "no allocation for a bad length");
}

#[test]
fn hello_with_wrong_magic_is_refused_as_foreign() {
    let mut buf = BytesMut::new();
    encode(
        &Message::Hello(Hello {
            version: ProtocolVersion(1),
            role: Role::Frontend,
            nonce: [7; 32],
        }),
        &mut buf,
    );
    // Corrupt the magic and fix up the checksum.
    buf[FRAME_HEADER_LEN + 1] = b'X';
    let crc = crc32c::crc32c(&buf[FRAME_HEADER_LEN..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(decode_frame(&buf), Err(DecodeError::BadMagic));
}

#[test]
fn write_data_is_sliced_not_copied() {
    let data = Bytes::from(vec![0xab; 4096]);
    let msg = Message::Request(Request {
        id: RequestId(1),
        epoch: Epoch(2),
        op: Op::Write {
            offset: 0,
            fua: true,
            mirrored: false,
            data: data.clone(),
        },
    });
    let mut buf = BytesMut::new();
    encode(&msg, &mut buf);
    let body = take_frame(&mut buf).expect("ok").expect("complete");
    let body_ptr = body.as_ptr() as usize;
    match decode_body(body).expect("decodes") {
        Message::Request(Request {
            op: Op::Write { data: d, .. },
            ..
        }) => {
            assert_eq!(d, data);
            let p = d.as_ptr() as usize;
            assert!(
                p > body_ptr && p < body_ptr + 64,
                "data points into the frame"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn peer_state(in_sync: Vec<ReplicaId>) -> Message {
    Message::Request(Request {
        id: RequestId(3),
        epoch: Epoch(4),
        op: Op::PeerState {
            you: ReplicaId::new("b").expect("valid"),
            peer: ReplicaId::new("a").expect("valid"),
            view: SyncView {
                epoch: Epoch(4),
                seq: 2,
                arbiter_version: ArbiterVersion::new("17").expect("valid"),
                in_sync,
            },
            peer_incarnation: 9,
            fence: Some(SessionGen(5)),
        },
    })
}

/// Re-encodes the frame's checksum after a test changed its body.
fn fix_crc(buf: &mut BytesMut) {
    let crc = crc32c::crc32c(&buf[FRAME_HEADER_LEN..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn a_view_listing_more_than_two_replicas_is_invalid() {
    let mut buf = BytesMut::new();
    encode(
        &peer_state(vec![ReplicaId::new("b").expect("valid")]),
        &mut buf,
    );
    // kind, id, epoch, "b", "a", view epoch, seq, "17", then the count.
    let at = FRAME_HEADER_LEN + 1 + 8 + 8 + 2 + 2 + 8 + 8 + 3;
    assert_eq!(buf[at], 1);
    buf[at] = 3;
    fix_crc(&mut buf);
    assert!(matches!(
        decode_frame(&buf),
        Err(DecodeError::Invalid {
            field: "in_sync",
            ..
        })
    ));
}

#[test]
fn an_unknown_session_kind_is_invalid() {
    let msg = Message::Request(Request {
        id: RequestId(1),
        epoch: Epoch(1),
        op: Op::FenceSessions {
            kind: SessionKind::Frontend,
            below: SessionGen(7),
        },
    });
    let mut buf = BytesMut::new();
    encode(&msg, &mut buf);
    let at = FRAME_HEADER_LEN + 1 + 8 + 8;
    assert_eq!(buf[at], 1);
    buf[at] = 9;
    fix_crc(&mut buf);
    assert!(matches!(
        decode_frame(&buf),
        Err(DecodeError::Invalid {
            field: "session kind",
            ..
        })
    ));
}

#[test]
fn an_overlong_arbiter_version_is_refused_by_its_constructor() {
    assert!(ArbiterVersion::new("9".repeat(255)).is_ok());
    assert_eq!(
        ArbiterVersion::new("9".repeat(256)),
        Err(ArbiterVersionTooLong { len: 256 })
    );
}
