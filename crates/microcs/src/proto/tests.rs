use super::*;
use proptest::prelude::*;

#[test]
fn request_round_trip() {
    let mut buf = Vec::new();
    encode(&mut buf, &Header::request(42, 1000), b"step", b"payload");
    let Decoded::Frame(f) = decode(&buf, DEFAULT_MAX_PAYLOAD).unwrap() else { panic!("incomplete") };
    assert_eq!(f.header, Header::request(42, 1000));
    assert_eq!((f.method, f.payload, f.len), (&b"step"[..], &b"payload"[..], buf.len()));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), max in 0u32..1024) {
        let _ = decode(&bytes, max);
    }

    #[test]
    fn encode_then_decode_round_trips(
        kind in 1u8..=8, flags in any::<u16>(), id in any::<u64>(), status in any::<u16>(),
        deadline_ms in any::<u32>(), method in "[a-z$]{0,64}", payload in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let header = Header { version: VERSION, kind, flags, id, status, deadline_ms };
        let mut buf = Vec::new();
        encode(&mut buf, &header, method.as_bytes(), &payload);
        let Decoded::Frame(f) = decode(&buf, payload.len() as u32).unwrap() else { panic!("incomplete") };
        prop_assert_eq!(f.header, header);
        prop_assert_eq!(f.method, method.as_bytes());
        prop_assert_eq!(f.payload, &payload[..]);
        prop_assert_eq!(f.len, buf.len());
        // Every strict prefix is "need more", never an error or a frame.
        for cut in 0..buf.len() {
            let incomplete = matches!(decode(&buf[..cut], payload.len() as u32), Ok(Decoded::Incomplete { .. }));
            prop_assert!(incomplete);
        }
        // One byte less of limit than the payload needs is refused before the body arrives.
        if !payload.is_empty() {
            let too_large = matches!(decode(&buf[..FRAME_OVERHEAD], payload.len() as u32 - 1), Err(DecodeError::TooLarge { .. }));
            prop_assert!(too_large);
        }
    }
}

#[test]
fn giant_length_is_refused_from_the_prefix_alone() {
    assert_eq!(
        decode(&[0xff, 0xff, 0xff, 0xff], DEFAULT_MAX_PAYLOAD),
        Err(DecodeError::TooLarge { declared: 0xffff_ffff, limit: DEFAULT_MAX_PAYLOAD })
    );
}

#[test]
fn method_names() {
    assert!(check_method("step").is_ok());
    assert!(check_method("$ping").is_ok());
    assert!(check_method("").is_err());
    assert!(check_method("$").is_err());
    assert!(check_method("a b").is_err());
    assert!(check_method(&"m".repeat(65)).is_err());
}
