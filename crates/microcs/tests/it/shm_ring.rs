//! Shared-memory rings of a configured size (`ServerBuilder::ring_capacity`, PROTOCOL.md
//! § 18.1), and the send timeout of a side whose peer never consumes its ring, across real
//! processes.

use std::io::{IoSliceMut, Read};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use microcs::ErrorKind;
use microcs::proto::{self, FEATURE_SHM, Header, Hello, HelloAck, Kind};

use crate::common::*;

/// The sizes of the shared-memory regions mapped by process `pid`.
fn shm_region_sizes(pid: u32) -> Vec<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter(|l| l.contains("microcs-shm"))
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
        })
        .collect()
}

/// Requests of sizes around and far past a ring's capacity, from both client flavours, to a
/// server (both flavours) with rings of `capacity` bytes: all echoed over shared memory, and the
/// region the server mapped has exactly that capacity.
#[test]
fn a_configured_ring_capacity_is_used_and_larger_frames_go_through_the_rings() {
    let _w = watchdog(Duration::from_secs(120));
    for (mode, capacity) in [("serve", 4096u32), ("serve-tokio", 4096), ("serve", 1 << 20)] {
        let dir = TempDir::new("shm-ring");
        let name = unique("SHM_RING");
        let ring = capacity.to_string();
        let server = PeerProcess::serve_mode(
            dir.path(),
            mode,
            &name,
            &[("PEER_SHM", "1"), ("PEER_SHM_RING", ring.as_str())],
        );
        let cap = capacity as usize;
        let sizes = [0, 100, cap - 24, cap, cap + 1, 3 * cap + 7, 2 << 20];
        let mut c = dir.client(&name).shared_memory(true).timeout(Duration::from_secs(30)).connect().unwrap();
        assert_eq!(c.transport(), Some("shm"), "{mode}");
        let regions = shm_region_sizes(server.pid);
        assert_eq!(
            regions,
            [4096 + 2 * u64::from(capacity)],
            "{mode}: the server's region for {capacity} B rings"
        );
        for &n in &sizes {
            let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            assert_eq!(c.request(&data).unwrap(), data, "{mode}, capacity {capacity}: {n} bytes");
        }
        // Both directions larger than the ring at once: the handler's reply, 2 MiB.
        assert_eq!(c.call("big", b"2097152").unwrap().len(), 2 << 20);
        // A byte on the socket after the handshake would be a protocol error that closes the
        // connection: still on the rings, every frame went through them.
        assert_eq!(c.transport(), Some("shm"));
        assert_eq!(c.request(b"after").unwrap(), b"after");
        tokio_client_round_trips(&dir, &name, &sizes);
        assert!(server.stop().success(), "{mode}");
    }
}

#[cfg(feature = "tokio")]
fn tokio_client_round_trips(dir: &TempDir, name: &str, sizes: &[usize]) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = tokio_shm_client(dir, name, Duration::from_secs(30)).await;
        for &n in sizes {
            let data: Vec<u8> = (0..n).map(|i| (i % 247) as u8).collect();
            assert_eq!(c.request(&data).await.unwrap(), data, "tokio client: {n} bytes");
        }
    });
}

#[cfg(not(feature = "tokio"))]
fn tokio_client_round_trips(_dir: &TempDir, _name: &str, _sizes: &[usize]) {}

#[test]
fn a_ring_capacity_out_of_bounds_is_refused_when_binding() {
    let dir = TempDir::new("shm-ringbad");
    for bytes in [0, 1, 2048, 4095, 5000, 3 << 20, 128 << 20, u32::MAX] {
        let e = microcs::Server::builder(&unique("RINGBAD"))
            .runtime_dir(dir.path())
            .shared_memory(true)
            .ring_capacity(bytes)
            .bind()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bytes}: {e}");
        assert!(e.to_string().contains("power of two from 4 KiB to 64 MiB"), "{bytes}: {e}");
    }
    #[cfg(feature = "tokio")]
    {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let e = rt
            .block_on(
                microcs::tokio::Server::builder(&unique("RINGBAD"))
                    .runtime_dir(dir.path())
                    .ring_capacity(6000)
                    .bind(),
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    }
    // The bounds themselves are accepted.
    for bytes in [4096, 64 << 20] {
        let s =
            microcs::Server::builder(&unique("RINGOK")).runtime_dir(dir.path()).ring_capacity(bytes).bind();
        assert!(s.is_ok(), "{bytes}: {:?}", s.err());
    }
}

/// A client that maps the rings by hand, as a hostile one would.
struct RawShmClient {
    socket: UnixStream,
    region: *mut u8,
    len: usize,
    capacity: usize,
    fds: Vec<OwnedFd>,
}

impl RawShmClient {
    fn connect(dir: &TempDir, name: &str) -> RawShmClient {
        let socket = UnixStream::connect(dir.path().join(format!("{name}.sock"))).unwrap();
        let mut hello = Vec::new();
        let body = Hello { max_payload: 16 << 20, features: FEATURE_SHM }.to_bytes();
        proto::encode(&mut hello, &Header::new(Kind::Hello, 0), b"", &body);
        std::io::Write::write_all(&mut &socket, &hello).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(5))];
        let mut anc = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &socket,
            &mut [IoSliceMut::new(&mut buf)],
            &mut anc,
            rustix::net::RecvFlags::CMSG_CLOEXEC,
        )
        .unwrap();
        let mut fds = Vec::new();
        for msg in anc.drain() {
            if let rustix::net::RecvAncillaryMessage::ScmRights(got) = msg {
                fds.extend(got);
            }
        }
        let proto::Decoded::Frame(f) = proto::decode(&buf[..got.bytes], 1 << 20).unwrap() else {
            panic!("no whole HelloAck in {} bytes", got.bytes)
        };
        let ack = HelloAck::parse(f.payload).expect("a HelloAck");
        assert!(ack.features & FEATURE_SHM != 0 && fds.len() == 5, "an offer with five descriptors");
        let capacity = ack.ring_capacity as usize;
        let len = 4096 + 2 * capacity;
        // The sealed memfd of `len` bytes (its size, as announced); unmapped on drop.
        let ptr = map_shared(&fds[0], len);
        RawShmClient { socket, region: ptr.cast(), len, capacity, fds }
    }

    /// Writes `frame` (shorter than the ring) into ring A as its writer, and wakes the server.
    fn send_first(&self, frame: &[u8]) {
        assert!(frame.len() <= self.capacity);
        // SAFETY: (test) ring A's data starts at 4096 and holds `capacity` bytes; its `tail` is
        // the 8-aligned word at 1024, only ever accessed atomically by the server.
        unsafe {
            std::ptr::copy_nonoverlapping(frame.as_ptr(), self.region.add(4096), frame.len());
            let tail = &*self.region.add(1024).cast::<std::sync::atomic::AtomicU64>();
            tail.store(frame.len() as u64, std::sync::atomic::Ordering::Release);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let _ = rustix::io::write(&self.fds[1], &1u64.to_ne_bytes()); // A.data
    }
}

impl Drop for RawShmClient {
    fn drop(&mut self) {
        // SAFETY: (test) the mapping made in `connect`, no longer used.
        let _ = unsafe { rustix::mm::munmap(self.region.cast(), self.len) };
    }
}

/// A client that asks for a reply much larger than the ring and never reads ring B: the
/// server's writer waits for room only as long as its write timeout (300 ms here; the blocking
/// server's bound is the socket's send timeout, which the link keeps), then drops the
/// connection; its other clients are served meanwhile and after.
#[test]
fn a_ring_never_consumed_holds_the_servers_write_timeout() {
    let _w = watchdog(Duration::from_secs(60));
    for mode in ["serve", "serve-tokio"] {
        let dir = TempDir::new("shm-wstall");
        let name = unique("SHM_WSTALL");
        let env = [("PEER_SHM", "1"), ("PEER_SHM_RING", "4096"), ("PEER_WRITE_TIMEOUT_MS", "300")];
        let server = PeerProcess::serve_mode(dir.path(), mode, &name, &env);
        let raw = RawShmClient::connect(&dir, &name);
        assert_eq!(raw.capacity, 4096);
        let mut frame = Vec::new();
        proto::encode(&mut frame, &Header::request(1, 0), b"big", b"1000000");
        let t0 = Instant::now();
        raw.send_first(&frame);
        // Meanwhile another client is served as usual.
        let mut other = dir.client(&name).shared_memory(true).connect().unwrap();
        assert_eq!(other.request(b"meanwhile").unwrap(), b"meanwhile");
        raw.socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let end = (&raw.socket).read(&mut [0u8; 16]);
        let took = t0.elapsed();
        assert!(
            matches!(&end, Ok(0))
                || end.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{mode}: the server dropped the connection: {end:?}"
        );
        assert!(
            took >= Duration::from_millis(250),
            "{mode}: dropped after {took:?}, before the write timeout"
        );
        assert!(took < Duration::from_secs(5), "{mode}: dropped after {took:?}, not at the write timeout");
        assert_eq!(other.request(b"after").unwrap(), b"after", "{mode}");
        assert!(server.stop().success(), "{mode}");
    }
}
