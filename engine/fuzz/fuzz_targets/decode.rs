//! Fuzzes the protocol decoder: any bytes, as a stream of frames and as a
//! frame body, must decode or be rejected, never panic; whatever decodes must
//! re-encode to the same bytes. Run: `cd engine/fuzz && cargo fuzz run decode`.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use twinvol_engine::protocol::codec::{decode_body, encode, take_frame};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(body)) = take_frame(&mut buf) {
        if let Ok(msg) = decode_body(body.clone()) {
            let mut out = BytesMut::new();
            encode(&msg, &mut out);
            assert_eq!(&out[8..], &body[..], "re-encoding differs");
        }
    }
    let _ = decode_body(Bytes::copy_from_slice(data));
});
