// The checks behind the fuzz targets, shared word for word with the corpus replay test
// (crates/microcs/tests/fuzz_corpus.rs) through `include!`, so an input the fuzzer saved is
// judged the same way in the normal `cargo test` run. Plain functions only: this file is
// included into other files, so it cannot carry inner attributes or module docs.

/// Feeds `data` to the frame decoder as a connection's reader would and checks that whatever it
/// says is consistent.
///
/// Input layout: the first 4 bytes (big-endian) are the connection's payload limit, the rest is
/// the byte stream a peer sent. With fewer than 4 bytes, the limit is the default and all of
/// `data` is the stream.
///
/// Checked: no panic; every frame re-encodes to exactly the bytes it was decoded from, respects
/// the limits, needs every one of its bytes, and decodes the same under a larger limit; "need
/// more" always asks for more than is there and for no more than the limit allows; an error is
/// decided by the bytes seen (more input does not change it) and maps to a documented status;
/// handshake bodies re-encode.
#[allow(dead_code)]
pub fn check_decode(data: &[u8]) {
    use microcs::proto::{
        self, DecodeError, Decoded, FRAME_OVERHEAD, HEADER_LEN, Hello, HelloAck, MAX_METHOD_LEN, VERSION,
    };

    let (limit, mut stream) = match data.split_first_chunk::<4>() {
        Some((l, rest)) => (u32::from_be_bytes(*l), rest),
        None => (proto::DEFAULT_MAX_PAYLOAD, data),
    };
    loop {
        match proto::decode(stream, limit) {
            Ok(Decoded::Frame(f)) => {
                assert!(f.len >= FRAME_OVERHEAD && f.len <= stream.len(), "frame length {}", f.len);
                assert_eq!(f.len, FRAME_OVERHEAD + f.method.len() + f.payload.len());
                assert!(f.method.len() <= MAX_METHOD_LEN);
                assert!(f.payload.len() as u64 <= u64::from(limit), "payload over the limit");
                assert_eq!(f.header.version, VERSION);
                let mut again = Vec::with_capacity(f.len);
                proto::encode(&mut again, &f.header, f.method, f.payload);
                assert_eq!(again, &stream[..f.len], "re-encoding changed the frame");
                assert_eq!(
                    proto::decode(&stream[..f.len - 1], limit),
                    Ok(Decoded::Incomplete { needed: f.len }),
                    "one byte short must ask for the whole frame"
                );
                assert_eq!(proto::decode(&stream[..f.len], limit), Ok(Decoded::Frame(f)));
                assert_eq!(
                    proto::decode(stream, u32::MAX),
                    Ok(Decoded::Frame(f)),
                    "a larger limit changed it"
                );
                if let Some(hello) = Hello::parse(f.payload) {
                    // Optional fields are written only when non-zero; the rest is ignored.
                    let bytes = hello.to_bytes();
                    assert!(bytes.len() >= Hello::LEN);
                    assert_eq!(bytes, f.payload[..bytes.len()]);
                }
                if let Some(ack) = HelloAck::parse(f.payload) {
                    // The fixed part and the name re-encode; the features word (and, with
                    // FEATURE_SHM, the ring capacity) follows when it is all there (an older
                    // server sends none: 0); bytes after it are ignored (room for later fields).
                    let bytes = ack.to_bytes();
                    let name_end = HelloAck::FIXED_LEN + ack.name.len();
                    assert_eq!(bytes[..name_end], f.payload[..name_end]);
                    if f.payload.len() >= bytes.len() {
                        assert_eq!(bytes, f.payload[..bytes.len()]);
                    } else {
                        assert_eq!(ack.features, 0, "a cut-short features word reads as none");
                    }
                }
                if let Ok(method) = std::str::from_utf8(f.method) {
                    let _ = proto::check_method(method);
                }
                let _ = (f.header.kind(), proto::status::reason(f.header.status));
                stream = &stream[f.len..];
            }
            Ok(Decoded::Incomplete { needed }) => {
                assert!(needed > stream.len(), "asked for {needed} bytes but {} are there", stream.len());
                assert!(
                    needed as u64 <= (FRAME_OVERHEAD + MAX_METHOD_LEN) as u64 + u64::from(limit),
                    "asked for {needed} bytes, more than limit {limit} allows"
                );
                return;
            }
            Err(e) => {
                let mut longer = stream.to_vec();
                longer.extend_from_slice(&[0u8; FRAME_OVERHEAD]);
                assert_eq!(proto::decode(&longer, limit), Err(e.clone()), "more input changed the error");
                assert!([400, 413, 505].contains(&e.status()), "status {}", e.status());
                if let DecodeError::TooShort { len } = e {
                    assert!((len as usize) < HEADER_LEN);
                }
                assert!(!e.to_string().is_empty());
                return;
            }
        }
    }
}

/// Checks the service-name parser, and the method-name check, against the rules as written in
/// DESIGN.md § 2 and docs/PROTOCOL.md § 13 (an independent re-statement, not the same code).
///
/// Input: the bytes as UTF-8 (names are strings in the API); invalid UTF-8 is checked in its
/// lossy form.
#[allow(dead_code)]
pub fn check_name(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let s: &str = &text;
    let token_ok =
        |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let name_ok = s.len() <= microcs::Name::MAX_LEN && !s.starts_with('-') && s.split('.').all(token_ok);
    match microcs::Name::new(s) {
        Ok(name) => {
            assert!(name_ok, "{s:?} was accepted as a name");
            assert_eq!(name.as_str(), s);
            assert_eq!(name.to_string(), s);
            assert_eq!(s.parse::<microcs::Name>().map(|n| n == name).ok(), Some(true));
            // Safe as a file name in the runtime directory.
            assert!(!s.is_empty() && !s.contains('/') && !s.contains("..") && !s.starts_with('.'));
        }
        Err(e) => {
            assert!(!name_ok, "{s:?} was refused as a name: {e}");
            assert_eq!(e.kind(), microcs::ErrorKind::InvalidName);
            assert!(e.to_string().contains("letters, digits"), "the message says what is allowed: {e}");
        }
    }
    let body = s.strip_prefix('$').unwrap_or(s);
    let method_ok = s.len() <= microcs::proto::MAX_METHOD_LEN
        && !body.is_empty()
        && body.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    match microcs::proto::check_method(s) {
        Ok(()) => assert!(method_ok, "{s:?} was accepted as a method"),
        Err(msg) => {
            assert!(!method_ok, "{s:?} was refused as a method: {msg}");
            assert!(msg.contains("letters, digits"), "the message says what is allowed: {msg}");
        }
    }
}

/// A blocking server shared by every `check_server_stream` call of this process: it lives in a
/// private temporary runtime directory and echoes; its methods cover an error and a built-in.
#[allow(dead_code)]
fn fuzz_server() -> &'static (std::path::PathBuf, String) {
    use std::sync::OnceLock;
    static SERVER: OnceLock<(std::path::PathBuf, String)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("microcs-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let name = "FUZZ".to_owned();
        let handle = microcs::Server::builder(&name)
            .runtime_dir(&dir)
            .max_frame(64 * 1024)
            .handshake_timeout(std::time::Duration::from_millis(500))
            .frame_timeout(std::time::Duration::from_millis(500))
            .method("fail", |_r: microcs::Request| {
                Err::<Vec<u8>, _>(microcs::RemoteError::new(418, "refused"))
            })
            .bind()
            .expect("fuzz server binds")
            .spawn(|r: microcs::Request| Ok::<_, microcs::RemoteError>(r.into_payload()))
            .expect("fuzz server starts");
        // Lives for the whole process, like the fuzzer.
        std::mem::forget(handle);
        (dir, name)
    })
}

/// Feeds `data` to a live server over a real connection, as a hostile client would, and checks
/// the server's state machine copes: it answers or closes within a bound (never hangs), and
/// afterwards still serves a well-behaved client.
///
/// Input layout: if the first byte is odd, a valid `Hello` is sent before the rest (so the
/// fuzzer reaches the states after the handshake); the remaining bytes are written as they are,
/// then the write side is shut.
#[allow(dead_code)]
pub fn check_server_stream(data: &[u8]) {
    use std::io::{Read, Write};
    use std::time::Duration;
    let (dir, name) = fuzz_server();
    let mut s = std::os::unix::net::UnixStream::connect(dir.join(format!("{name}.sock"))).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let (first, rest) = data.split_first().map_or((0, data), |(f, r)| (*f, r));
    if first & 1 == 1 {
        let mut hello = Vec::new();
        let h = microcs::proto::Hello { max_payload: 1 << 20, features: 0 };
        microcs::proto::encode(&mut hello, &microcs::proto::Header::new(microcs::proto::Kind::Hello, 0), b"", &h.to_bytes());
        let _ = s.write_all(&hello);
    }
    // The server may close early (a fatal frame): a failed write is fine.
    let _ = s.write_all(rest);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server neither answered nor closed within 10 s: {e}"),
        }
    }
    let mut client = microcs::Client::builder(name)
        .runtime_dir(dir)
        .timeout(Duration::from_secs(10))
        .connect()
        .expect("the server still accepts a well-behaved client");
    assert_eq!(client.request(b"ok").expect("and serves it"), b"ok");
}

/// Drives the reading side of a shared-memory connection with a hostile peer's script (see
/// `microcs::__fuzz::run_script` for its operations: honest writes, forged indices, scribbles
/// anywhere in the region, reads with small or large buffers).
///
/// Checked: no panic and no access outside the region (the mapping would fault); with honest
/// indices, never a corrupt-ring error and never more bytes read than written; a corrupt ring
/// is reported as the transport's error ("shared memory: ..."), which the clients turn into
/// `ErrorKind::Protocol`; the read buffer holds memory in proportion to the bytes read (plus at
/// most one small frame's declared size), whatever the bytes declare; every frame decoded took
/// at least a header's worth of bytes.
#[allow(dead_code)]
pub fn check_ring(data: &[u8]) {
    let Ok(run) = microcs::__fuzz::run_script(data) else {
        return; // no memfd on this system: nothing to drive
    };
    if !run.index_forged {
        assert!(!run.corrupt, "honest indices reported as corrupt: {run:?}");
        assert!(run.bytes_read <= run.bytes_written, "read more than was written: {run:?}");
    }
    if run.corrupt {
        let msg = run.error.as_deref().unwrap_or("");
        assert!(msg.starts_with("shared memory: "), "a corrupt ring says so: {msg}");
    }
    // The read buffer may grow toward a small frame's declared size (payloads under 64 KiB go
    // into the ordinary buffer, each fill doubling it at most) before its bytes come; a large
    // frame's payload only reserves address space. So: the bytes read, plus one small frame.
    let small_frame = (64 * 1024 + microcs::proto::FRAME_OVERHEAD + microcs::proto::MAX_METHOD_LEN) as u64;
    assert!(
        run.buffer_high_water as u64 <= 3 * run.bytes_read + small_frame + 8 * 1024,
        "memory follows the bytes read: {run:?}"
    );
    assert!(
        run.frames as u64 * microcs::proto::FRAME_OVERHEAD as u64 <= run.bytes_read,
        "each frame took its bytes: {run:?}"
    );
}
