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

// ---------------------------------------------------------------------------------------------
// docs/PROTOCOL.md is checked here: its golden hex blocks must decode and re-encode byte for byte,
// its rejected and partial examples must fail exactly as stated, and its tables of kinds, flags
// and status codes must match the constants. So the specification cannot drift from the code.
// ---------------------------------------------------------------------------------------------

const PROTOCOL_MD: &str = include_str!("../../../../docs/PROTOCOL.md");
const STATUS_RS: &str = include_str!("status.rs");

/// One ` ```hex KIND=NAME [limit=N] ` block of the specification.
#[derive(Debug)]
pub(super) struct HexBlock {
    /// `golden`, `reject` or `incomplete`.
    pub(super) kind: String,
    pub(super) name: String,
    /// Payload limit to decode with (`limit=N`, default 16 MiB).
    pub(super) limit: u32,
    pub(super) bytes: Vec<u8>,
    /// 1-based line of the opening fence, for failure messages.
    pub(super) line: usize,
}

/// Every hex block of the specification, in order. Two hex digits per byte, separated by white
/// space; `#` starts a comment. Anything else inside a block is an error, so a typo cannot be
/// skipped silently.
pub(super) fn hex_blocks() -> Vec<HexBlock> {
    let mut out = Vec::new();
    let mut lines = PROTOCOL_MD.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let line_no = n + 1;
        assert_ne!(
            line.trim(),
            "```hex",
            "line {line_no}: a hex block needs golden=, reject= or incomplete="
        );
        let Some(info) = line.strip_prefix("```hex ") else { continue };
        let mut words = info.split_whitespace();
        let (kind, name) = words
            .next()
            .and_then(|w| w.split_once('='))
            .unwrap_or_else(|| panic!("line {line_no}: expected ```hex KIND=NAME, found {line:?}"));
        assert!(
            ["golden", "reject", "incomplete"].contains(&kind),
            "line {line_no}: unknown block kind {kind:?}"
        );
        let mut limit = DEFAULT_MAX_PAYLOAD;
        for w in words {
            match w.split_once('=') {
                Some(("limit", v)) => {
                    limit = v.parse().unwrap_or_else(|e| panic!("line {line_no}: limit {v:?}: {e}"))
                }
                _ => panic!("line {line_no}: unknown attribute {w:?}"),
            }
        }
        let mut bytes = Vec::new();
        loop {
            let (m, l) =
                lines.next().unwrap_or_else(|| panic!("line {line_no}: hex block {name:?} is not closed"));
            if l.trim_start().starts_with("```") {
                break;
            }
            let data = l.split('#').next().unwrap_or("");
            for tok in data.split_whitespace() {
                let byte = (tok.len() == 2).then(|| u8::from_str_radix(tok, 16).ok()).flatten();
                bytes.push(byte.unwrap_or_else(|| panic!("line {}: {tok:?} is not two hex digits", m + 1)));
            }
        }
        out.push(HexBlock { kind: kind.to_owned(), name: name.to_owned(), limit, bytes, line: line_no });
    }
    let mut names: Vec<_> = out.iter().map(|b| b.name.as_str()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "hex block names must be unique");
    out
}

fn blocks_of(kind: &str) -> Vec<HexBlock> {
    hex_blocks().into_iter().filter(|b| b.kind == kind).collect()
}

/// What each golden frame of the specification must decode to.
fn golden_expectations() -> Vec<(&'static str, Header, &'static [u8], Vec<u8>)> {
    let not_run_system = FLAG_NOT_RUN | FLAG_SYSTEM;
    let ack = HelloAck {
        max_payload: DEFAULT_MAX_PAYLOAD,
        max_in_flight: 128,
        pid: 4242,
        name: "LIFE_GEN".into(),
        features: FEATURE_STREAMS,
        ring_capacity: 0,
    };
    vec![
        (
            "hello",
            Header::new(Kind::Hello, 0),
            b"",
            Hello { max_payload: DEFAULT_MAX_PAYLOAD, features: 0 }.to_bytes().to_vec(),
        ),
        ("hello-ack", Header::new(Kind::HelloAck, 0), b"", ack.to_bytes()),
        (
            "hello-shm",
            Header::new(Kind::Hello, 0),
            b"",
            Hello { max_payload: DEFAULT_MAX_PAYLOAD, features: FEATURE_SHM }.to_bytes(),
        ),
        (
            "hello-ack-shm",
            Header::new(Kind::HelloAck, 0),
            b"",
            HelloAck { features: FEATURE_STREAMS | FEATURE_SHM, ring_capacity: 256 * 1024, ..ack.clone() }
                .to_bytes(),
        ),
        ("request-method", Header::request(7, 250), b"step", b"hello".to_vec()),
        ("request-default", Header::request(1, 30_000), b"", b"Give me some data back!!".to_vec()),
        ("request-builtin", Header::request(2, 30_000), b"$ping", Vec::new()),
        ("reply", Header::new(Kind::Reply, 7), b"", b"world".to_vec()),
        ("error-handler", Header::error(7, status::HANDLER_FAILED, 0), b"", b"board is empty".to_vec()),
        (
            "error-request",
            Header::error(9, status::NO_METHOD, not_run_system),
            b"",
            b"service 'LIFE_GEN' has no method 'jump' (it has: step)".to_vec(),
        ),
        (
            "error-connection",
            Header::error(0, status::BUSY, not_run_system),
            b"",
            b"service 'LIFE_GEN' is at its limit of 1024 connections; try again later".to_vec(),
        ),
        ("cancel", Header::new(Kind::Cancel, 7), b"", Vec::new()),
        ("ping", Header::new(Kind::Ping, 3), b"", b"hi".to_vec()),
        ("pong", Header::new(Kind::Pong, 3), b"", b"hi".to_vec()),
        ("stream-request", Header { flags: FLAG_STREAM, ..Header::request(9, 0) }, b"run", b"3".to_vec()),
        (
            "credit",
            Header::new(Kind::Credit, 9),
            b"",
            Credit { items: DEFAULT_WINDOW_ITEMS, bytes: DEFAULT_WINDOW_BYTES }.to_bytes().to_vec(),
        ),
        ("item", Header::new(Kind::Item, 9), b"", b"#.#".to_vec()),
        ("stream-end", Header::new(Kind::Reply, 9), b"", Vec::new()),
    ]
}

#[test]
fn golden_frames_in_protocol_md_decode_and_reencode_byte_for_byte() {
    let blocks = blocks_of("golden");
    let expected = golden_expectations();
    let mut doc_names: Vec<_> = blocks.iter().map(|b| b.name.as_str()).collect();
    let mut want_names: Vec<_> = expected.iter().map(|e| e.0).collect();
    doc_names.sort_unstable();
    want_names.sort_unstable();
    assert_eq!(doc_names, want_names, "golden blocks in docs/PROTOCOL.md vs. this test's table");
    let mut kinds_seen = std::collections::BTreeSet::new();
    for b in &blocks {
        let (_, header, method, payload) = expected.iter().find(|e| e.0 == b.name).unwrap();
        let ctx = format!("golden={} (docs/PROTOCOL.md line {})", b.name, b.line);
        let Ok(Decoded::Frame(f)) = decode(&b.bytes, b.limit) else {
            panic!("{ctx}: does not decode: {:?}", decode(&b.bytes, b.limit))
        };
        assert_eq!(f.len, b.bytes.len(), "{ctx}: the block holds more than one frame");
        assert_eq!(f.header, *header, "{ctx}: header");
        assert_eq!(f.method, *method, "{ctx}: method");
        assert_eq!(f.payload, &payload[..], "{ctx}: payload {:?}", String::from_utf8_lossy(f.payload));
        let mut again = Vec::new();
        encode(&mut again, &f.header, f.method, f.payload);
        assert_eq!(again, b.bytes, "{ctx}: re-encoding differs");
        for cut in 0..b.bytes.len() {
            assert!(
                matches!(decode(&b.bytes[..cut], b.limit), Ok(Decoded::Incomplete { .. })),
                "{ctx}: cut {cut}"
            );
        }
        match f.header.kind() {
            Some(Kind::Hello) => {
                let hello = Hello::parse(f.payload).unwrap();
                assert_eq!(hello.to_bytes(), f.payload, "{ctx}: Hello body");
            }
            Some(Kind::HelloAck) => {
                let ack = HelloAck::parse(f.payload).unwrap();
                assert_eq!(ack.to_bytes(), f.payload, "{ctx}: HelloAck body");
            }
            _ => {}
        }
        kinds_seen.insert(f.header.kind);
    }
    assert_eq!(
        kinds_seen.into_iter().collect::<Vec<_>>(),
        (1..=10).collect::<Vec<u8>>(),
        "a golden frame of every kind"
    );
}

#[test]
fn golden_frames_back_to_back_decode_one_after_another() {
    // A connection's byte stream is frames back to back; decoding must stop exactly at each end.
    let blocks = blocks_of("golden");
    let stream: Vec<u8> = blocks.iter().flat_map(|b| b.bytes.iter().copied()).collect();
    let mut rest = &stream[..];
    for b in &blocks {
        let Ok(Decoded::Frame(f)) = decode(rest, DEFAULT_MAX_PAYLOAD) else { panic!("{}", b.name) };
        assert_eq!(&rest[..f.len], &b.bytes[..], "{}", b.name);
        rest = &rest[f.len..];
    }
    assert_eq!(decode(rest, DEFAULT_MAX_PAYLOAD), Ok(Decoded::Incomplete { needed: FRAME_OVERHEAD }));
}

#[test]
fn rejected_and_partial_examples_in_protocol_md_fail_as_documented() {
    let limit = DEFAULT_MAX_PAYLOAD;
    let rejects: Vec<(&str, DecodeError, u16)> = vec![
        ("too-short", DecodeError::TooShort { len: 3 }, status::BAD_REQUEST),
        ("giant-length", DecodeError::TooLarge { declared: 0xffff_ffff, limit }, status::TOO_LARGE),
        ("http", DecodeError::TooLarge { declared: 1_195_725_856, limit }, status::TOO_LARGE),
        ("version-2", DecodeError::UnsupportedVersion { version: 2 }, status::VERSION_UNSUPPORTED),
        ("method-too-long", DecodeError::BadMethodLength { method_len: 65 }, status::BAD_REQUEST),
        ("method-past-end", DecodeError::BadMethodLength { method_len: 4 }, status::BAD_REQUEST),
        ("payload-over-limit", DecodeError::TooLarge { declared: 5, limit: 4 }, status::TOO_LARGE),
    ];
    let blocks = blocks_of("reject");
    assert_eq!(blocks.len(), rejects.len(), "reject blocks in docs/PROTOCOL.md vs. this test's table");
    for (name, err, code) in rejects {
        let b = blocks.iter().find(|b| b.name == name).unwrap_or_else(|| panic!("no reject={name} block"));
        assert_eq!(decode(&b.bytes, b.limit), Err(err.clone()), "reject={name} (line {})", b.line);
        assert_eq!(err.status(), code, "reject={name}");
        // The error is decided by the bytes shown: more input does not change it.
        let mut longer = b.bytes.clone();
        longer.extend_from_slice(&[0u8; 100]);
        assert_eq!(decode(&longer, b.limit), Err(err), "reject={name} with more bytes");
    }
    let partial = [("request-first-10", 24), ("request-header-only", 33)];
    let blocks = blocks_of("incomplete");
    assert_eq!(blocks.len(), partial.len(), "incomplete blocks in docs/PROTOCOL.md vs. this test's table");
    let request = blocks_of("golden").into_iter().find(|b| b.name == "request-method").unwrap();
    for (name, needed) in partial {
        let b =
            blocks.iter().find(|b| b.name == name).unwrap_or_else(|| panic!("no incomplete={name} block"));
        assert_eq!(decode(&b.bytes, b.limit), Ok(Decoded::Incomplete { needed }), "incomplete={name}");
        assert!(request.bytes.starts_with(&b.bytes), "incomplete={name} is a prefix of request-method");
    }
}

/// Rows of the table that follows `<!-- table: NAME -->`, header and separator skipped, cells
/// trimmed and without backticks.
fn doc_table(name: &str) -> Vec<Vec<String>> {
    let start = format!("<!-- table: {name} -->");
    let after = PROTOCOL_MD.split_once(&start).unwrap_or_else(|| panic!("no {start} in docs/PROTOCOL.md")).1;
    let body = after.split_once("<!-- end table -->").expect("table end marker").0;
    body.lines()
        .filter(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().replace('`', "")).collect())
        .collect()
}

#[test]
fn kind_table_in_protocol_md_matches_the_code() {
    let rows = doc_table("kinds");
    assert_eq!(rows.len(), 10);
    for row in &rows {
        let raw: u8 = row[0].parse().unwrap();
        let kind = Kind::from_u8(raw).unwrap_or_else(|| panic!("kind {raw} is not defined"));
        assert_eq!(format!("{kind:?}"), row[1], "kind {raw}");
        assert_eq!(kind as u8, raw);
    }
    assert_eq!(Kind::from_u8(0), None);
    assert_eq!(Kind::from_u8(11), None);
}

#[test]
fn flag_table_in_protocol_md_matches_the_code() {
    let rows = doc_table("flags");
    let mut all = 0;
    for row in &rows {
        let bit = u16::from_str_radix(row[0].trim_start_matches("0x"), 16).unwrap();
        let constant = match row[1].as_str() {
            "FLAG_NOT_RUN" => FLAG_NOT_RUN,
            "FLAG_SYSTEM" => FLAG_SYSTEM,
            "FLAG_STREAM" => FLAG_STREAM,
            other => panic!("unknown flag {other}"),
        };
        assert_eq!(bit, constant, "{}", row[1]);
        all |= bit;
    }
    assert_eq!(all, KNOWN_FLAGS);
}

#[test]
fn status_table_in_protocol_md_lists_every_code_of_status_rs() {
    // Read the constants from the source, so a code added there but not documented fails here.
    let consts: Vec<(String, u16)> = STATUS_RS
        .lines()
        .filter_map(|l| l.strip_prefix("pub const "))
        .map(|l| {
            let (name, rest) = l.split_once(": u16 = ").expect("pub const NAME: u16 = N;");
            (name.to_owned(), rest.trim_end_matches(';').parse().expect("a number"))
        })
        .collect();
    let rows = doc_table("status");
    assert_eq!(rows.len(), consts.len(), "rows of the status table vs. constants in status.rs");
    for (name, code) in &consts {
        let row = rows
            .iter()
            .find(|r| r[0] == code.to_string())
            .unwrap_or_else(|| panic!("status {code} ({name}) is not in the docs/PROTOCOL.md table"));
        assert_eq!(&row[1], name, "constant of {code}");
        assert_eq!(row[2], status::reason(*code), "reason of {code}");
        let system = crate::error::Error::from_remote("X", *code, FLAG_SYSTEM, String::new());
        assert_eq!(format!("{:?}", system.kind()), row[4], "ErrorKind of {code} with FLAG_SYSTEM");
        let handler = crate::error::Error::from_remote("X", *code, 0, String::new());
        assert_eq!(handler.kind(), crate::ErrorKind::Remote, "without FLAG_SYSTEM every code is Remote");
    }
    assert_eq!(status::reason(999), "error");
}

#[test]
fn a_timeout_the_server_noticed_reads_like_one_the_client_noticed() {
    // Both sides hold the same deadline, so which one speaks first is a race; the caller must
    // not see two different stories (nor "refused" for a handler that ran).
    let ran = crate::error::Error::from_remote("X", status::TIMED_OUT, FLAG_SYSTEM, "late".into());
    assert_eq!(ran.kind(), crate::ErrorKind::TimedOut);
    assert!(ran.may_have_run());
    assert_eq!(ran.to_string(), "service 'X' did not answer in time (late); the request may have run");
    let not_run =
        crate::error::Error::from_remote("X", status::TIMED_OUT, FLAG_SYSTEM | FLAG_NOT_RUN, "early".into());
    assert!(!not_run.may_have_run());
    assert!(not_run.to_string().ends_with("the request did not run"), "{not_run}");
}

// ---------------------------------------------------------------------------------------------
// The decoder's rules, one by one (docs/PROTOCOL.md § 3).
// ---------------------------------------------------------------------------------------------

fn frame(header: &Header, method: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    encode(&mut b, header, method, payload);
    b
}

#[test]
fn incomplete_asks_for_the_header_then_the_whole_frame() {
    let b = frame(&Header::request(1, 0), b"m", b"abc");
    for cut in 0..FRAME_OVERHEAD {
        assert_eq!(decode(&b[..cut], 100), Ok(Decoded::Incomplete { needed: FRAME_OVERHEAD }), "cut {cut}");
    }
    for cut in FRAME_OVERHEAD..b.len() {
        assert_eq!(decode(&b[..cut], 100), Ok(Decoded::Incomplete { needed: b.len() }), "cut {cut}");
    }
    assert!(matches!(decode(&b, 100), Ok(Decoded::Frame(f)) if f.len == b.len()));
}

#[test]
fn the_smallest_frame_is_a_bare_header_and_one_byte_less_is_too_short() {
    let b = frame(&Header::new(Kind::Cancel, 1), b"", b"");
    assert_eq!(b.len(), FRAME_OVERHEAD);
    assert_eq!(&b[..4], &[0, 0, 0, HEADER_LEN as u8]);
    assert!(matches!(decode(&b, 0), Ok(Decoded::Frame(_))));
    assert_eq!(decode(&[0, 0, 0, 19], 0), Err(DecodeError::TooShort { len: 19 }));
    assert_eq!(decode(&[0, 0, 0, 0], 0), Err(DecodeError::TooShort { len: 0 }));
}

#[test]
fn payload_limit_is_exact_and_method_bytes_do_not_count() {
    let max_method = "m".repeat(MAX_METHOD_LEN);
    let b = frame(&Header::request(1, 0), max_method.as_bytes(), &[7; 10]);
    assert!(matches!(decode(&b, 10), Ok(Decoded::Frame(f)) if f.payload.len() == 10));
    // With the longest method, one byte of payload over the limit is refused from the prefix...
    assert_eq!(decode(&b[..4], 9), Err(DecodeError::TooLarge { declared: 94, limit: 9 }));
    // ...and with a short method, from the header, before the body is in.
    let b = frame(&Header::request(1, 0), b"m", &[7; 10]);
    assert_eq!(decode(&b[..FRAME_OVERHEAD], 9), Err(DecodeError::TooLarge { declared: 10, limit: 9 }));
    // The prefix check allows the longest method on top of the limit...
    let at_bound = (HEADER_LEN + MAX_METHOD_LEN + 10) as u32;
    assert!(matches!(decode(&at_bound.to_be_bytes(), 10), Ok(Decoded::Incomplete { needed: 24 })));
    // ...and refuses one byte more from the four length bytes alone.
    assert_eq!(
        decode(&(at_bound + 1).to_be_bytes(), 10),
        Err(DecodeError::TooLarge { declared: u64::from(at_bound) + 1, limit: 10 })
    );
    // A limit of u32::MAX cannot overflow the check.
    assert!(matches!(decode(&[0xff; 4], u32::MAX), Ok(Decoded::Incomplete { needed: 24 })));
}

#[test]
fn method_length_limits() {
    let m64 = "a".repeat(64);
    let b = frame(&Header::request(1, 0), m64.as_bytes(), b"");
    assert!(matches!(decode(&b, 0), Ok(Decoded::Frame(f)) if f.method == m64.as_bytes()));
    // 65 declared in the header: refused even with the bytes present.
    let mut b = frame(&Header::request(1, 0), b"", &[b'a'; 65]);
    b[18..20].copy_from_slice(&65u16.to_be_bytes());
    assert_eq!(decode(&b, 100), Err(DecodeError::BadMethodLength { method_len: 65 }));
    // Method length equal to the body: an empty payload is fine.
    let mut b = frame(&Header::request(1, 0), b"", b"abc");
    b[18..20].copy_from_slice(&3u16.to_be_bytes());
    assert!(matches!(decode(&b, 0), Ok(Decoded::Frame(f)) if f.method == b"abc" && f.payload.is_empty()));
}

#[test]
fn checks_run_in_the_documented_order() {
    // Giant length beats a bad version: decided from the prefix alone.
    let mut b = frame(&Header { version: 9, ..Header::request(1, 0) }, b"", b"");
    b[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(decode(&b, 0), Err(DecodeError::TooLarge { .. })));
    // A bad version beats a bad method length.
    let mut b = frame(&Header { version: 0, ..Header::request(1, 0) }, b"", b"");
    b[18..20].copy_from_slice(&u16::MAX.to_be_bytes());
    assert_eq!(decode(&b, 0), Err(DecodeError::UnsupportedVersion { version: 0 }));
    // A bad method length beats a payload over the limit.
    let mut b = frame(&Header::request(1, 0), b"", &[0; 50]);
    b[18..20].copy_from_slice(&100u16.to_be_bytes());
    assert_eq!(decode(&b, 1), Err(DecodeError::BadMethodLength { method_len: 100 }));
}

#[test]
fn unknown_kinds_and_flags_still_decode() {
    // Kind and flags are the receiver's business, so the stream stays in sync.
    for raw in [0u8, 11, 42, 255] {
        let h = Header { kind: raw, flags: 0xffff, ..Header::new(Kind::Ping, 5) };
        let b = frame(&h, b"", b"x");
        let Ok(Decoded::Frame(f)) = decode(&b, 10) else { panic!("kind {raw}") };
        assert_eq!((f.header.kind(), f.header.kind, f.header.flags), (None, raw, 0xffff));
    }
}

#[test]
fn every_field_is_big_endian_at_its_documented_offset() {
    let h = Header {
        version: VERSION,
        kind: Kind::Request as u8,
        flags: 0x0102,
        id: 0x0304_0506_0708_090a,
        status: 0x0b0c,
        deadline_ms: 0x0d0e_0f10,
    };
    let b = frame(&h, b"xy", b"z");
    assert_eq!(
        b,
        [
            0, 0, 0, 23, // length
            1, 3, // version, kind
            1, 2, // flags
            3, 4, 5, 6, 7, 8, 9, 10, // id
            11, 12, // status
            0, 2, // method length
            13, 14, 15, 16, // deadline_ms
            b'x', b'y', b'z',
        ]
    );
    assert_eq!(&h.to_bytes(2, 1)[..], &b[..FRAME_OVERHEAD]);
}

#[test]
#[should_panic(expected = "method name longer than 64 bytes")]
fn encoding_a_method_over_64_bytes_is_a_caller_bug() {
    let _ = Header::request(1, 0).to_bytes(65, 0);
}

#[test]
fn decode_errors_map_to_status_codes_and_say_what_happened() {
    let cases = [
        (DecodeError::TooLarge { declared: 20, limit: 10 }, status::TOO_LARGE, "over the limit of 10 bytes"),
        (DecodeError::TooShort { len: 3 }, status::BAD_REQUEST, "shorter than the 20-byte header"),
        (
            DecodeError::UnsupportedVersion { version: 2 },
            status::VERSION_UNSUPPORTED,
            "version 2 is not supported",
        ),
        (DecodeError::BadMethodLength { method_len: 65 }, status::BAD_REQUEST, "method name length 65"),
    ];
    for (e, code, text) in cases {
        assert_eq!(e.status(), code);
        let msg = e.to_string();
        assert!(msg.contains(text), "{msg}");
        assert!(msg.starts_with(|c: char| c.is_lowercase()), "messages are lower-case: {msg}");
    }
}

#[test]
fn hello_body_ignores_extra_bytes_and_refuses_short_ones() {
    assert_eq!(Hello::parse(&[0, 0, 1, 0]), Some(Hello { max_payload: 256, features: 0 }));
    assert_eq!(
        Hello::parse(&[0, 0, 1, 0, 9, 9, 9]),
        Some(Hello { max_payload: 256, features: 0 }),
        "room for later fields"
    );
    assert_eq!(Hello::parse(&[0, 0, 1]), None);
    assert_eq!(Hello::parse(&[]), None);
}

#[test]
fn hello_ack_body_layout() {
    let ack = HelloAck { max_payload: 1, max_in_flight: 2, pid: 3, name: "a.b".into(), ..Default::default() };
    assert_eq!(ack.to_bytes(), [0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 3, b'a', b'.', b'b', 0, 0, 0, 0]);
    assert_eq!(HelloAck::parse(&ack.to_bytes()), Some(ack.clone()));
    // An older server's answer ends after the name: no optional features.
    assert_eq!(HelloAck::parse(&ack.to_bytes()[..17]), Some(ack.clone()));
    let streams = HelloAck { features: FEATURE_STREAMS, ..ack.clone() };
    assert_eq!(&streams.to_bytes()[17..], &[0, 0, 0, 1]);
    assert_eq!(HelloAck::parse(&streams.to_bytes()).map(|a| a.features), Some(FEATURE_STREAMS));
    // Bytes after the name are room for later fields, and ignored.
    let mut longer = ack.to_bytes();
    longer.extend_from_slice(&[9, 9, 9]);
    assert_eq!(HelloAck::parse(&longer), Some(ack));
    assert_eq!(HelloAck::parse(&[0; 14]).map(|a| a.name), Some(String::new()));
    assert_eq!(HelloAck::parse(&[0; 13]), None);
    assert_eq!(HelloAck::parse(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, b'a']), None, "name cut short");
    let mut bad = vec![0; 12];
    bad.extend_from_slice(&[0, 2, 0xff, 0xfe]);
    assert_eq!(HelloAck::parse(&bad), None, "a non-UTF-8 name is refused");
}

#[test]
fn hello_features_are_optional_and_the_shm_offer_needs_its_capacity() {
    let plain = Hello { max_payload: 9, features: 0 };
    assert_eq!(plain.to_bytes().len(), Hello::LEN, "no feature: the version-1 bytes");
    let shm = Hello { max_payload: 9, features: FEATURE_SHM };
    assert_eq!(Hello::parse(&shm.to_bytes()), Some(shm));
    let ack = HelloAck { name: "A".into(), features: FEATURE_SHM, ring_capacity: 4096, ..Default::default() };
    let bytes = ack.to_bytes();
    assert_eq!(bytes.len(), HelloAck::FIXED_LEN + 1 + 8);
    assert_eq!(HelloAck::parse(&bytes), Some(ack));
    assert_eq!(HelloAck::parse(&bytes[..bytes.len() - 1]), None, "FEATURE_SHM without its capacity");
    let streams = HelloAck { features: FEATURE_STREAMS, ..Default::default() };
    assert_eq!(streams.to_bytes().len(), HelloAck::FIXED_LEN + 4, "no capacity without FEATURE_SHM");
    assert_eq!(HelloAck::parse(&streams.to_bytes()), Some(streams));
}

#[test]
fn features_table_matches_the_constants() {
    let rows = doc_table("features");
    let bits: Vec<(String, String)> = rows.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    assert_eq!(
        bits,
        [
            (format!("{FEATURE_STREAMS:#x}"), "FEATURE_STREAMS".to_owned()),
            (format!("{FEATURE_SHM:#x}"), "FEATURE_SHM".to_owned()),
        ]
    );
}

#[test]
fn method_name_rules() {
    for ok in ["a", "step", "$ping", "$x", "a.b-c_D9", &"m".repeat(64), &format!("${}", "m".repeat(63))] {
        assert!(check_method(ok).is_ok(), "{ok:?}");
    }
    for bad in ["", "$", "$$x", "a$", "a/b", "é", "a\0", &"m".repeat(65), &format!("${}", "m".repeat(64))] {
        let msg = check_method(bad).unwrap_err();
        assert!(msg.contains("letters, digits"), "{bad:?}: {msg}");
    }
}

/// A small deterministic generator, so a failure names a seed that reproduces it.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Whatever `decode` says about `buf` must be self-consistent; returns the frame count.
fn check_stream(buf: &[u8], limit: u32) -> usize {
    let mut rest = buf;
    let mut frames = 0;
    loop {
        match decode(rest, limit) {
            Ok(Decoded::Frame(f)) => {
                assert!(f.len >= FRAME_OVERHEAD && f.len <= rest.len());
                assert!(f.method.len() <= MAX_METHOD_LEN && f.payload.len() as u64 <= u64::from(limit));
                let mut again = Vec::new();
                encode(&mut again, &f.header, f.method, f.payload);
                assert_eq!(again, &rest[..f.len]);
                assert_eq!(decode(&rest[..f.len - 1], limit), Ok(Decoded::Incomplete { needed: f.len }));
                rest = &rest[f.len..];
                frames += 1;
            }
            Ok(Decoded::Incomplete { needed }) => {
                assert!(needed > rest.len());
                assert!(needed as u64 <= (FRAME_OVERHEAD + MAX_METHOD_LEN) as u64 + u64::from(limit));
                return frames;
            }
            Err(e) => {
                let mut longer = rest.to_vec();
                longer.extend_from_slice(&[0; FRAME_OVERHEAD]);
                assert_eq!(decode(&longer, limit), Err(e));
                return frames;
            }
        }
    }
}

#[test]
fn a_large_random_corpus_of_mutated_frames_decodes_consistently() {
    // Random bytes rarely get past the length check, so start from valid streams (the golden
    // frames and random ones) and flip, insert, delete and truncate bytes. Complements the
    // cargo-fuzz target in fuzz/, which needs a nightly toolchain.
    let goldens: Vec<Vec<u8>> = blocks_of("golden").into_iter().map(|b| b.bytes).collect();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut frames = 0;
    for round in 0..100_000u32 {
        let mut buf = Vec::new();
        for _ in 0..1 + rng.next() % 3 {
            if rng.next() % 2 == 0 {
                buf.extend_from_slice(&goldens[(rng.next() % goldens.len() as u64) as usize]);
            } else {
                let kind = (rng.next() % 10) as u8;
                let h = Header {
                    kind,
                    flags: rng.next() as u16 & 3,
                    ..Header::request(rng.next() % 4, rng.next() as u32)
                };
                let method = "abcdefgh".repeat(8);
                let m = &method.as_bytes()[..(rng.next() % 65) as usize];
                let p: Vec<u8> = (0..rng.next() % 40).map(|_| rng.next() as u8).collect();
                encode(&mut buf, &h, m, &p);
            }
        }
        for _ in 0..rng.next() % 4 {
            let at = (rng.next() % (buf.len() as u64 + 1)) as usize;
            match rng.next() % 4 {
                0 if at < buf.len() => buf[at] ^= 1 << (rng.next() % 8),
                1 => buf.insert(at, rng.next() as u8),
                2 if at < buf.len() => {
                    buf.remove(at);
                }
                _ => buf.truncate(at),
            }
        }
        let limit = match rng.next() % 4 {
            0 => DEFAULT_MAX_PAYLOAD,
            1 => u32::MAX,
            _ => (rng.next() % 80) as u32,
        };
        let r = std::panic::catch_unwind(|| check_stream(&buf, limit));
        frames += r.unwrap_or_else(|_| panic!("round {round}: limit {limit}, input {buf:02x?}"));
    }
    assert!(frames > 50_000, "the corpus must exercise whole frames, got {frames}");
}

#[test]
fn deadline_rounds_up() {
    use std::time::Duration;
    assert_eq!(deadline_ms(Duration::from_micros(1)), 1);
    assert_eq!(deadline_ms(Duration::from_millis(1500)), 1500);
    assert_eq!(deadline_ms(Duration::from_micros(1500)), 2);
    assert_eq!(deadline_ms(Duration::from_secs(u64::MAX / 2)), u32::MAX);
    let t0 = std::time::Instant::now();
    assert_eq!(deadline_at(t0, 0), None);
    assert_eq!(deadline_at(t0, 250), Some(t0 + Duration::from_millis(250)));
}
