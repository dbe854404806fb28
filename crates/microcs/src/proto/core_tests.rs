//! The connection core driven directly: frames in, frames and outcomes out, no sockets. The
//! golden examples of docs/PROTOCOL.md are the inputs and the expected outputs, so the state
//! machines are checked against the specification itself.

use std::time::{Duration, Instant};

use super::client_conn::{self, Attempt, Incoming, Loss, Outcome, Written};
use super::server_conn::{self, Action, Out, ServerConn};
use super::tests::hex_blocks;
use super::*;
use crate::dispatch::{self, Answer, Begin, End, Incoming as Call, ReplyLimit};
use crate::error::{ErrorKind, RemoteError};
use crate::name::Name;
use crate::request::{Peer, Request};
use crate::service::{Identity, Service};

/// The handlers these tests route to: plain functions, never streaming.
impl crate::handler::Streams for fn(Request) -> Result<Vec<u8>, RemoteError> {
    fn streams(&self) -> bool {
        false
    }
}

fn golden(name: &str) -> Vec<u8> {
    hex_blocks().into_iter().find(|b| b.name == name).unwrap_or_else(|| panic!("no golden {name}")).bytes
}

fn frame(bytes: &[u8]) -> Frame<'_> {
    match decode(bytes, DEFAULT_MAX_PAYLOAD).expect("decodes") {
        Decoded::Frame(f) => f,
        Decoded::Incomplete { .. } => panic!("whole frame expected"),
    }
}

fn wire(out: &Out) -> Vec<u8> {
    let mut b = Vec::new();
    encode(&mut b, &out.header, b"", &out.payload);
    b
}

type Handler = fn(Request) -> Result<Vec<u8>, RemoteError>;

/// The service of the golden examples: `LIFE_GEN` with one method, `step`, answering "world".
fn life_gen() -> Service<Handler> {
    let step: Handler = |_| Ok(b"world".to_vec());
    let default: Handler = |_| Err(RemoteError::new(status::HANDLER_FAILED, "board is empty"));
    Service::new(Name::new("LIFE_GEN").unwrap(), Identity::default(), default, vec![("step".into(), step)])
}

/// A server connection after the golden handshake.
fn open() -> ServerConn {
    let conn = ServerConn::new(DEFAULT_MAX_PAYLOAD, 128);
    let ack = conn.on_hello(&frame(&golden("hello")), 4242, "LIFE_GEN").expect("hello accepted").answer(None);
    assert_eq!(wire(&ack), golden("hello-ack"), "the HelloAck of the specification");
    conn
}

/// Runs one admitted request through dispatch as a flavour does.
fn serve(conn: &ServerConn, service: &Service<Handler>, bytes: &[u8], arrived: Instant) -> Option<Out> {
    let f = frame(bytes);
    match conn.on_frame(&f, false, "LIFE_GEN") {
        Action::Request => {}
        Action::Send(out) => return Some(out),
        Action::None => return None,
    }
    let a = conn.admit(&f.header, arrived).map_err(|o| wire(&o)).expect("admitted");
    let call = Call {
        id: a.id,
        peer: Peer { pid: 1, uid: 0, gid: 0 },
        payload: f.payload.to_vec(),
        deadline: a.deadline,
        cancel: a.cancel,
        stream: a.stream,
        transport: None,
        arrived: Instant::now(),
    };
    let answer = match dispatch::begin(service, f.method, call) {
        Begin::Answer(answer) => Some(answer),
        Begin::Run(run, req) => {
            let end = End::Done((run.handler())(req));
            run.finish(end, ReplyLimit { max: conn.max_reply() as usize, what: "the client's limit" })
        }
    };
    conn.answer(a.id, answer)
}

#[test]
fn the_golden_conversation_on_the_server_side() {
    let service = life_gen();
    let conn = open();
    let now = Instant::now();
    let reply = serve(&conn, &service, &golden("request-method"), now).expect("answered");
    assert_eq!(wire(&reply), golden("reply"));
    // Request 9 names a method the service does not have.
    let mut jump = Vec::new();
    encode(&mut jump, &Header::request(9, 250), b"jump", b"");
    assert_eq!(wire(&serve(&conn, &service, &jump, now).unwrap()), golden("error-request"));
    // The default handler's plain error, for request 7 again (7 is no longer in flight).
    let mut dflt = Vec::new();
    encode(&mut dflt, &Header::request(7, 250), b"", b"");
    assert_eq!(wire(&serve(&conn, &service, &dflt, now).unwrap()), golden("error-handler"));
    // Ping is answered by the Pong of the specification.
    assert_eq!(wire(&serve(&conn, &service, &golden("ping"), now).unwrap()), golden("pong"));
    // Built-ins answer at once with JSON.
    let ping = serve(&conn, &service, &golden("request-builtin"), now).unwrap();
    assert_eq!(ping.header.kind(), Some(Kind::Reply));
    assert!(std::str::from_utf8(&ping.payload).unwrap().contains("io.nats.micro.v1.ping_response"));
    // The connection limit refusal of the specification.
    assert_eq!(wire(&server_conn::at_connection_limit("LIFE_GEN", 1024)), golden("error-connection"));
}

#[test]
fn the_first_frame_must_be_a_hello() {
    let conn = ServerConn::new(DEFAULT_MAX_PAYLOAD, 128);
    let refusal = conn.on_hello(&frame(&golden("ping")), 1, "X").unwrap_err();
    assert_eq!((refusal.header.id, refusal.header.status), (0, status::BAD_REQUEST));
    assert_eq!(refusal.header.flags, FLAG_SYSTEM | FLAG_NOT_RUN);
}

#[test]
fn requests_are_admitted_in_the_order_of_the_specification() {
    let conn = open();
    let check = |h: Header, stopping: bool| match conn.on_frame(&frame(&encoded(&h)), stopping, "LIFE_GEN") {
        Action::Send(out) => (out.header.status, out.header.flags, String::from_utf8(out.payload).unwrap()),
        Action::Request | Action::None => panic!("refusal expected for {h:?}"),
    };
    let nr = FLAG_SYSTEM | FLAG_NOT_RUN;
    let flagged = Header { flags: 0x0008, ..Header::request(5, 0) };
    assert_eq!(check(flagged, true).0, status::BAD_REQUEST, "flags are checked before shutdown");
    let (code, flags, msg) = check(Header::request(0, 0), false);
    assert_eq!((code, flags), (status::BAD_REQUEST, nr));
    assert!(msg.contains("id 0 is reserved"), "{msg}");
    let (code, flags, msg) = check(Header::request(5, 0), true);
    assert_eq!((code, flags), (status::BUSY, nr), "shutting down: safe to send again");
    assert!(msg.contains("shutting down"), "{msg}");
    // An id already in flight.
    let h = Header::request(5, 0);
    let _first = conn.admit(&h, Instant::now()).unwrap();
    let Err(dup) = conn.admit(&h, Instant::now()) else { panic!("a second request 5 is refused") };
    assert_eq!((dup.header.id, dup.header.status, dup.header.flags), (5, status::BAD_REQUEST, nr));
    // Frames a client may not send, and unknown kinds, are refused under their own id.
    for kind in [Kind::Reply as u8, Kind::Error as u8, Kind::Hello as u8, 42] {
        let h = Header { kind, ..Header::new(Kind::Reply, 11) };
        let (code, flags, msg) = check(h, false);
        assert_eq!((code, flags), (status::BAD_REQUEST, nr), "{msg}");
    }
}

fn encoded(h: &Header) -> Vec<u8> {
    let mut b = Vec::new();
    encode(&mut b, h, b"", b"");
    b
}

#[test]
fn a_cancelled_request_gets_no_answer() {
    let service = life_gen();
    let conn = open();
    let f = golden("request-method");
    let f = frame(&f);
    assert!(matches!(conn.on_frame(&f, false, "LIFE_GEN"), Action::Request));
    let a = conn.admit(&f.header, Instant::now()).unwrap();
    let cancel = a.cancel.clone();
    let call = Call {
        id: 7,
        peer: Peer { pid: 1, uid: 0, gid: 0 },
        payload: Vec::new(),
        deadline: a.deadline,
        cancel: a.cancel,
        stream: a.stream,
        transport: None,
        arrived: Instant::now(),
    };
    let Begin::Run(run, req) = dispatch::begin(&service, b"step", call) else { panic!("runs") };
    assert!(matches!(conn.on_frame(&frame(&golden("cancel")), false, "LIFE_GEN"), Action::None));
    assert!(cancel.is_set(), "the Cancel reached the request");
    let end = End::Done((run.handler())(req));
    let answer = run.finish(end, ReplyLimit { max: 1 << 20, what: "the client's limit" });
    assert_eq!(answer, None);
    assert_eq!(conn.answer(7, answer), None);
}

#[test]
fn deadlines_decide_whether_and_how_a_request_is_answered() {
    let service = life_gen();
    let conn = open();
    let limit = ReplyLimit { max: 1 << 20, what: "the client's limit" };
    // Arrived long ago with 10 ms to go: refused before the handler starts, not run.
    let past = Instant::now() - Duration::from_secs(1);
    let mut b = Vec::new();
    encode(&mut b, &Header::request(21, 10), b"step", b"");
    let out = serve(&conn, &service, &b, past).unwrap();
    assert_eq!((out.header.status, out.header.flags), (status::TIMED_OUT, FLAG_SYSTEM | FLAG_NOT_RUN));
    // The deadline passes while the handler runs: 408 FLAG_SYSTEM, may have run.
    let call = |id| Call {
        id,
        peer: Peer { pid: 1, uid: 0, gid: 0 },
        payload: Vec::new(),
        deadline: Some(Instant::now() + Duration::from_millis(20)),
        cancel: Default::default(),
        stream: false,
        transport: None,
        arrived: Instant::now(),
    };
    let Begin::Run(run, req) = dispatch::begin(&service, b"step", call(22)) else { panic!("runs") };
    std::thread::sleep(Duration::from_millis(40));
    let end = End::Done((run.handler())(req));
    let answer = run.finish(end, limit);
    assert!(
        matches!(answer, Some(Answer::Error { code: status::TIMED_OUT, flags: FLAG_SYSTEM, .. })),
        "{answer:?}"
    );
    // Stopped at the deadline by the flavour: the same answer.
    let Begin::Run(run, _req) = dispatch::begin(&service, b"step", call(23)) else { panic!("runs") };
    let answer = run.finish(End::Deadline, limit);
    assert!(
        matches!(answer, Some(Answer::Error { code: status::TIMED_OUT, flags: FLAG_SYSTEM, .. })),
        "{answer:?}"
    );
    // A handler's own error keeps its code and carries no flag; a panic is 500.
    let Begin::Run(run, _req) = dispatch::begin(&service, b"", call(24)) else { panic!("runs") };
    let answer = run.finish(End::Panicked("handler panicked: boom".into()), limit);
    assert_eq!(answer, Some(Answer::Error { code: 500, flags: 0, message: "handler panicked: boom".into() }));
}

#[test]
fn nothing_goes_out_over_the_clients_limit() {
    let conn = ServerConn::new(DEFAULT_MAX_PAYLOAD, 128);
    let mut hello = Vec::new();
    encode(&mut hello, &Header::new(Kind::Hello, 0), b"", &Hello { max_payload: 8, features: 0 }.to_bytes());
    let ack = conn.on_hello(&frame(&hello), 1, "A_LONGER_NAME_THAN_8").unwrap().answer(None);
    assert_eq!(conn.fit(ack.clone()), ack, "the HelloAck always fits");
    let cut = conn.fit(Out::error(3, 418, 0, "héllo wörld"));
    assert_eq!(cut.payload, "héllo w".as_bytes(), "cut on a character boundary");
    let big = conn.answer(4, Some(Answer::Reply(vec![0; 9]))).unwrap();
    assert_eq!(
        (big.header.kind(), big.header.status, big.header.flags),
        (Some(Kind::Error), 413, FLAG_SYSTEM)
    );
    // dispatch refuses an oversized handler reply itself (it ran: no FLAG_NOT_RUN).
    let service = life_gen();
    let call = Call {
        id: 5,
        peer: Peer { pid: 1, uid: 0, gid: 0 },
        payload: Vec::new(),
        deadline: None,
        cancel: Default::default(),
        stream: false,
        transport: None,
        arrived: Instant::now(),
    };
    let Begin::Run(run, req) = dispatch::begin(&service, b"step", call) else { panic!("runs") };
    let end = End::Done((run.handler())(req));
    let answer = run.finish(end, ReplyLimit { max: 3, what: "the client's limit" });
    let Some(Answer::Error { code, flags, message }) = answer else { panic!("413 expected") };
    assert_eq!((code, flags), (413, FLAG_SYSTEM));
    assert_eq!(message, "reply of 5 bytes is over the client's limit of 3 bytes");
}

#[test]
fn the_golden_conversation_on_the_client_side() {
    let name = Name::new("LIFE_GEN").unwrap();
    let path = std::path::Path::new("/run/user/1000/microcs/LIFE_GEN.sock");
    assert_eq!(client_conn::hello(DEFAULT_MAX_PAYLOAD, 0), golden("hello"));
    let ack = client_conn::handshake_answer(&name, path, &frame(&golden("hello-ack"))).unwrap();
    assert_eq!((ack.pid, ack.name.as_str(), ack.max_in_flight), (4242, "LIFE_GEN", 128));
    let refused =
        client_conn::handshake_answer(&name, path, &frame(&golden("error-connection"))).unwrap_err();
    assert!(!refused.may_have_run(), "{refused}");
    let not_microcs = client_conn::handshake_answer(&name, path, &frame(&golden("pong"))).unwrap_err();
    assert_eq!(not_microcs.kind(), ErrorKind::Protocol);
    let mut req = Vec::new();
    encode(&mut req, &client_conn::request_header(7, Duration::from_micros(249_001)), b"step", b"hello");
    assert_eq!(req, golden("request-method"), "250 ms left, rounded up");
    let ids = client_conn::Ids::new();
    assert_eq!((ids.next(), ids.next()), (1, 2));
    assert!(matches!(client_conn::classify(&frame(&golden("reply"))), Incoming::Reply(7)));
    assert!(matches!(client_conn::classify(&frame(&golden("pong"))), Incoming::Ignore));
    assert!(matches!(client_conn::classify(&frame(&golden("ping"))), Incoming::Ping(3)));
    let Incoming::Error { id: 7, status, flags, message } =
        client_conn::classify(&frame(&golden("error-handler")))
    else {
        panic!("error for 7")
    };
    let t = Duration::from_secs(1);
    let Err(Attempt::Failed(e)) = client_conn::settle(&name, t, Outcome::Error { status, flags, message })
    else {
        panic!("a handler's error is final")
    };
    assert_eq!(e.kind(), ErrorKind::Remote);
    assert!(e.may_have_run());
    let Incoming::Closing(loss) = client_conn::classify(&frame(&golden("error-connection"))) else {
        panic!("id 0 ends the connection")
    };
    assert!(!loss.error(&name, Written::All).may_have_run(), "FLAG_NOT_RUN on the connection error");
}

#[test]
fn only_a_request_that_provably_did_not_run_is_sent_again() {
    let name = Name::new("X").unwrap();
    let t = Duration::from_secs(1);
    let busy =
        Outcome::Error { status: status::BUSY, flags: FLAG_SYSTEM | FLAG_NOT_RUN, message: "down".into() };
    assert!(matches!(client_conn::settle(&name, t, busy), Err(Attempt::NotRun(_))));
    let busy_ran = Outcome::Error { status: status::BUSY, flags: FLAG_SYSTEM, message: "x".into() };
    assert!(matches!(client_conn::settle(&name, t, busy_ran), Err(Attempt::Failed(_))));
    let lost = |written| Outcome::Lost { loss: Loss::Closed(None), written };
    assert!(matches!(client_conn::settle(&name, t, lost(Written::None)), Err(Attempt::NotRun(_))));
    let Err(Attempt::Failed(part)) = client_conn::settle(&name, t, lost(Written::Part)) else { panic!() };
    assert!(!part.may_have_run(), "a frame cut short is never decoded");
    let Err(Attempt::Failed(all)) = client_conn::settle(&name, t, lost(Written::All)) else { panic!() };
    assert!(all.may_have_run() && all.kind() == ErrorKind::Closed, "{all}");
    let Err(Attempt::Failed(late)) = client_conn::settle(&name, t, Outcome::TimedOut) else { panic!() };
    assert!(late.may_have_run() && late.kind() == ErrorKind::TimedOut);
    assert_eq!(Written::of(10, 20, 20), Written::All);
    assert_eq!(Written::of(10, 20, 15), Written::Part);
    assert_eq!(Written::of(10, 20, 10), Written::None);
}
