//! One single-producer/single-consumer byte ring in the shared region, and the region's header
//! (PROTOCOL.md § 18.2–§ 18.4).
//!
//! Each side keeps the index it owns (`tail` for the writer, `head` for the reader) privately
//! and only publishes it; the peer's index is read once per operation and validated, so a peer
//! writing garbage anywhere in the region can make this side see garbage bytes (which the codec
//! rejects) or a corrupt-ring error, never an access outside the data area or a wait that does
//! not end.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use super::map::Mapping;

/// Size of the region's header page; ring A's data follows it, then ring B's.
pub(crate) const HEADER_LEN: usize = 4096;
/// `"mcsh"`, little-endian.
pub(crate) const MAGIC: u32 = 0x6873_636d;
/// Layout version of § 18.2.
pub(crate) const LAYOUT_VERSION: u32 = 1;
/// Smallest and largest ring capacity a client accepts.
pub(crate) const MIN_CAPACITY: u32 = 4096;
pub(crate) const MAX_CAPACITY: u32 = 64 << 20;

const CTL_A: usize = 1024;
const CTL_B: usize = 2048;
const TAIL: usize = 0;
const HEAD: usize = 64;
const READER_PARKED: usize = 128;
const READER_CPU: usize = 132;
const READER_CLOSED: usize = 136;
const WRITER_PARKED: usize = 192;

/// Which ring: `A` carries the client's frames to the server, `B` the server's to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    A,
    B,
}

/// The region's length for rings of `capacity` bytes.
pub(crate) fn region_len(capacity: u32) -> usize {
    HEADER_LEN + 2 * capacity as usize
}

/// True for a capacity this implementation accepts: a power of two in 4 KiB–64 MiB.
pub(crate) fn valid_capacity(capacity: u32) -> bool {
    capacity.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity)
}

/// The error for a ring capacity [`valid_capacity`] refuses, naming the bounds.
pub(crate) fn capacity_error(capacity: u32) -> crate::Error {
    crate::Error::new(
        crate::ErrorKind::InvalidConfig,
        format!(
            "shared-memory ring capacity {capacity}: must be a power of two from {} KiB to {} MiB",
            MIN_CAPACITY >> 10,
            MAX_CAPACITY >> 20
        ),
    )
}

/// Writes the header of a new region (before it is sent).
pub(crate) fn init_header(m: &Mapping, capacity: u32) {
    m.u32_at(0).store(MAGIC, Ordering::Relaxed);
    m.u32_at(4).store(LAYOUT_VERSION, Ordering::Relaxed);
    m.u32_at(8).store(capacity, Ordering::Release);
}

/// Checks a received region's header against the capacity announced in the `HelloAck`.
pub(crate) fn check_header(m: &Mapping, capacity: u32) -> io::Result<()> {
    let (magic, version, cap) = (
        m.u32_at(0).load(Ordering::Acquire),
        m.u32_at(4).load(Ordering::Acquire),
        m.u32_at(8).load(Ordering::Acquire),
    );
    if magic != MAGIC || version != LAYOUT_VERSION || cap != capacity || m.len() != region_len(capacity) {
        return Err(corrupt(format!(
            "unexpected shared-memory header (magic {magic:#x}, layout {version}, capacity {cap}, {} bytes)",
            m.len()
        )));
    }
    Ok(())
}

/// Where one ring lives in the region.
#[derive(Debug, Clone, Copy)]
struct At {
    ctl: usize,
    data: usize,
    cap: usize,
}

impl At {
    fn of(dir: Dir, capacity: u32) -> At {
        let cap = capacity as usize;
        match dir {
            Dir::A => At { ctl: CTL_A, data: HEADER_LEN, cap },
            Dir::B => At { ctl: CTL_B, data: HEADER_LEN + cap, cap },
        }
    }

    fn word64<'m>(&self, m: &'m Mapping, field: usize) -> &'m AtomicU64 {
        m.u64_at(self.ctl + field)
    }

    fn word32<'m>(&self, m: &'m Mapping, field: usize) -> &'m AtomicU32 {
        m.u32_at(self.ctl + field)
    }

    /// The bytes the stream positions `from..from + n` occupy, as at most two (offset, length)
    /// pieces of the data area (a wrap splits them). `n <= cap`.
    fn pieces(&self, from: u64, n: usize) -> [(usize, usize); 2] {
        let start = (from as usize) & (self.cap - 1);
        let first = n.min(self.cap - start);
        [(self.data + start, first), (self.data, n - first)]
    }
}

/// A write or a read of more than this publishes its index every this many bytes, not only at
/// its end (PROTOCOL.md § 18.2): so the peer copies a large frame's first bytes out while we
/// copy the next ones in, instead of the two copies of a ring's worth taking turns (and each
/// side's wait for the other lasting a whole ring's copy, longer than it spins).
pub(crate) const PUBLISH_EVERY: usize = 32 * 1024;

/// The writing end of a ring.
#[derive(Debug)]
pub(crate) struct Writer {
    at: At,
    /// Bytes ever written: ours, never read back from the region.
    tail: AtomicU64,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wrote {
    pub n: usize,
    /// The reader said it sleeps: signal its eventfd.
    pub wake: bool,
}

impl Writer {
    pub(crate) fn new(dir: Dir, capacity: u32) -> Writer {
        Writer { at: At::of(dir, capacity), tail: AtomicU64::new(0) }
    }

    /// Bytes ever written.
    pub(crate) fn position(&self) -> u64 {
        self.tail.load(Ordering::Relaxed)
    }

    /// Bytes ever consumed by the reader, as it says (validated against what we wrote).
    pub(crate) fn consumed(&self, m: &Mapping) -> io::Result<u64> {
        let tail = self.position();
        let head = self.at.word64(m, HEAD).load(Ordering::Acquire);
        if tail.wrapping_sub(head) > self.at.cap as u64 {
            return Err(corrupt(format!(
                "ring read index {head} is not within {} bytes of {tail}",
                self.at.cap
            )));
        }
        Ok(head)
    }

    /// Free room now.
    pub(crate) fn room(&self, m: &Mapping) -> io::Result<usize> {
        let used = self.position().wrapping_sub(self.consumed(m)?);
        Ok(self.at.cap - used as usize)
    }

    /// Writes as much of `parts` as fits now, in order, and publishes it.
    pub(crate) fn write(&self, m: &Mapping, parts: &[IoSlice<'_>]) -> io::Result<Wrote> {
        let mut room = self.room(m)?;
        let mut tail = self.position();
        let start = tail;
        let mut published = start;
        for part in parts {
            if room == 0 {
                break;
            }
            let take = part.len().min(room);
            let mut src = &part[..take];
            for (off, len) in self.at.pieces(tail, take) {
                for at in (0..len).step_by(PUBLISH_EVERY) {
                    let c = (len - at).min(PUBLISH_EVERY);
                    m.copy_in(off + at, &src[..c]);
                    src = &src[c..];
                    tail = tail.wrapping_add(c as u64);
                    if tail.wrapping_sub(published) >= PUBLISH_EVERY as u64 {
                        // Release: these bytes are in place before the reader may see them.
                        self.at.word64(m, TAIL).store(tail, Ordering::Release);
                        published = tail;
                    }
                }
            }
            room -= take;
        }
        let n = tail.wrapping_sub(start) as usize;
        if n == 0 {
            return Ok(Wrote { n, wake: false });
        }
        self.tail.store(tail, Ordering::Relaxed);
        self.at.word64(m, TAIL).store(tail, Ordering::Release);
        // Pairs with the reader's fence after it announced parking (PROTOCOL.md § 18.3).
        fence(Ordering::SeqCst);
        Ok(Wrote { n, wake: self.at.word32(m, READER_PARKED).load(Ordering::Relaxed) == 1 })
    }

    /// The reader stopped reading (its side was shut): writes would never be read.
    pub(crate) fn reader_closed(&self, m: &Mapping) -> bool {
        self.at.word32(m, READER_CLOSED).load(Ordering::Acquire) != 0
    }

    /// The CPU the reader (our peer) last ran on, plus one; 0 unknown.
    pub(crate) fn peer_cpu(&self, m: &Mapping) -> u32 {
        self.at.word32(m, READER_CPU).load(Ordering::Relaxed)
    }

    /// Announces (or withdraws) that we sleep until there is room.
    pub(crate) fn set_parked(&self, m: &Mapping, parked: bool) {
        self.at.word32(m, WRITER_PARKED).store(u32::from(parked), Ordering::Relaxed);
        if parked {
            fence(Ordering::SeqCst);
        }
    }
}

/// The reading end of a ring.
#[derive(Debug)]
pub(crate) struct Reader {
    at: At,
    /// Bytes ever consumed: ours, never read back from the region.
    head: AtomicU64,
}

/// What a read did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Read {
    pub n: usize,
    /// The writer said it sleeps for room: signal its eventfd.
    pub wake: bool,
}

impl Reader {
    pub(crate) fn new(dir: Dir, capacity: u32) -> Reader {
        Reader { at: At::of(dir, capacity), head: AtomicU64::new(0) }
    }

    /// Bytes ever consumed.
    pub(crate) fn position(&self) -> u64 {
        self.head.load(Ordering::Relaxed)
    }

    /// Unread bytes now, as the writer says (validated: at most the capacity).
    pub(crate) fn available(&self, m: &Mapping) -> io::Result<usize> {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.at.word64(m, TAIL).load(Ordering::Acquire);
        let n = tail.wrapping_sub(head);
        if n > self.at.cap as u64 {
            return Err(corrupt(format!(
                "ring write index {tail} is not within {} bytes of {head}",
                self.at.cap
            )));
        }
        Ok(n as usize)
    }

    /// Copies up to `buf.len()` unread bytes into `buf`.
    pub(crate) fn read(&self, m: &Mapping, buf: &mut [u8]) -> io::Result<Read> {
        let n = self.available(m)?.min(buf.len());
        let head = self.head.load(Ordering::Relaxed);
        let mut dst = &mut buf[..n];
        self.copy_out_chunked(m, head, n, |off, c| {
            let (now, rest) = std::mem::take(&mut dst).split_at_mut(c);
            m.copy_out(off, now);
            dst = rest;
        });
        Ok(self.consume(m, head, n))
    }

    /// Appends up to `max` unread bytes (at least 1 when any) to `v`.
    pub(crate) fn read_spare(&self, m: &Mapping, v: &mut Vec<u8>, max: usize) -> io::Result<Read> {
        let n = self.available(m)?.min(max.max(1));
        let head = self.head.load(Ordering::Relaxed);
        self.copy_out_chunked(m, head, n, |off, c| m.append_to(off, c, v));
        Ok(self.consume(m, head, n))
    }

    /// Has `copy(offset, len)` copy out the `n` bytes from `head`, at most [`PUBLISH_EVERY`] at
    /// a time, handing each one's room back to the writer as soon as it is copied (the last
    /// is left to [`consume`](Self::consume), with its fence).
    fn copy_out_chunked(&self, m: &Mapping, head: u64, n: usize, mut copy: impl FnMut(usize, usize)) {
        let mut done = 0;
        for (off, len) in self.at.pieces(head, n) {
            for at in (0..len).step_by(PUBLISH_EVERY) {
                let c = (len - at).min(PUBLISH_EVERY);
                copy(off + at, c);
                done += c;
                if done < n {
                    // Release: our copies of these bytes are done before the writer may reuse
                    // them.
                    self.at.word64(m, HEAD).store(head.wrapping_add(done as u64), Ordering::Release);
                }
            }
        }
    }

    fn consume(&self, m: &Mapping, head: u64, n: usize) -> Read {
        if n == 0 {
            return Read { n, wake: false };
        }
        let head = head.wrapping_add(n as u64);
        self.head.store(head, Ordering::Relaxed);
        // Release: our copies are done before the writer may reuse the room.
        self.at.word64(m, HEAD).store(head, Ordering::Release);
        fence(Ordering::SeqCst);
        Read { n, wake: self.at.word32(m, WRITER_PARKED).load(Ordering::Relaxed) == 1 }
    }

    /// Announces (or withdraws) that we sleep until there is data. Announcing is followed by a
    /// `SeqCst` fence; the caller then checks [`available`](Self::available) once more before
    /// sleeping (PROTOCOL.md § 18.3).
    pub(crate) fn set_parked(&self, m: &Mapping, parked: bool) {
        self.at.word32(m, READER_PARKED).store(u32::from(parked), Ordering::Relaxed);
        if parked {
            fence(Ordering::SeqCst);
        }
    }

    /// Publishes the CPU we run on (plus one), for the writer's same-CPU check.
    pub(crate) fn publish_cpu(&self, m: &Mapping, cpu_plus_one: u32) {
        let w = self.at.word32(m, READER_CPU);
        if w.load(Ordering::Relaxed) != cpu_plus_one {
            w.store(cpu_plus_one, Ordering::Relaxed);
        }
    }

    /// We read no more: the writer's further writes fail.
    pub(crate) fn close(&self, m: &Mapping) {
        self.at.word32(m, READER_CLOSED).store(1, Ordering::Release);
    }
}

pub(crate) fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("shared memory: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CAP: u32 = 4096;

    fn region() -> (std::os::fd::OwnedFd, Mapping) {
        let (fd, m) = Mapping::create(region_len(CAP)).unwrap();
        init_header(&m, CAP);
        (fd, m)
    }

    /// A writer and a reader on two threads moving frames larger than the ring, through a ring
    /// larger than [`PUBLISH_EVERY`]: the indices published mid-copy never let the reader see
    /// a byte before it is written nor the writer overwrite one not yet read. (That the reader
    /// sees a write's first part before the write ends shows only when the two threads run at
    /// once, so it is counted, not asserted: on a loaded or one-CPU machine a write may run
    /// whole between two looks of the reader. The 1 MiB echo over shared memory measures it:
    /// docs/BENCHMARKS.md.)
    #[test]
    fn large_writes_stream_through_with_both_copies_overlapping() {
        const BIG: u32 = 256 * 1024;
        let (_fd, m) = Mapping::create(region_len(BIG)).unwrap();
        init_header(&m, BIG);
        let m = std::sync::Arc::new(m);
        let total = 24 << 20;
        let byte = |i: usize| (i % 251) as u8;
        let mw = m.clone();
        let writer = std::thread::spawn(move || {
            let w = Writer::new(Dir::A, BIG);
            let data: Vec<u8> = (0..total).map(byte).collect();
            let (mut sent, mut ends) = (0, std::collections::HashSet::new());
            while sent < total {
                // Frame-sized slices, cut into a header-like part and the rest.
                let end = (sent + (1 << 20)).min(total);
                let cut = (sent + 16).min(end);
                let n =
                    w.write(&mw, &[IoSlice::new(&data[sent..cut]), IoSlice::new(&data[cut..end])]).unwrap().n;
                if n == 0 {
                    std::hint::spin_loop();
                }
                sent += n;
                ends.insert(sent);
            }
            ends
        });
        let r = Reader::new(Dir::A, BIG);
        // Where each read ended: all that was published then (a read takes up to a whole ring).
        let (mut got, mut seen) = (Vec::with_capacity(total), Vec::new());
        while got.len() < total {
            let before = got.len();
            r.read_spare(&m, &mut got, 1 << 20).unwrap();
            if got.len() > before {
                seen.push(got.len());
            }
        }
        let ends = writer.join().unwrap();
        let bad = got.iter().enumerate().find(|&(i, &b)| b != byte(i));
        assert_eq!(bad, None, "the stream came out as it went in");
        let mid_write = seen.iter().filter(|s| !ends.contains(s)).count();
        eprintln!("{mid_write} of {} reads ended inside a write", seen.len());
    }

    /// The same through [`Reader::read`] into a caller's buffer (the blocking flavour's and
    /// `try_recv`'s path), with buffers of odd sizes on both sides so that reads and writes
    /// start and end anywhere relative to the ring's wrap and to [`PUBLISH_EVERY`].
    #[test]
    fn large_reads_into_a_buffer_see_only_written_bytes() {
        const BIG: u32 = 128 * 1024;
        let (_fd, m) = Mapping::create(region_len(BIG)).unwrap();
        init_header(&m, BIG);
        let m = std::sync::Arc::new(m);
        let total = 12 << 20;
        let byte = |i: usize| (i.wrapping_mul(31) % 253) as u8;
        let mw = m.clone();
        let writer = std::thread::spawn(move || {
            let w = Writer::new(Dir::B, BIG);
            let data: Vec<u8> = (0..total).map(byte).collect();
            let (mut sent, mut k) = (0, 0usize);
            while sent < total {
                k += 1;
                let end = (sent + 1 + (k * 40_009) % 300_000).min(total);
                let cut = (sent + (k % 5) * 7).min(end);
                let n =
                    w.write(&mw, &[IoSlice::new(&data[sent..cut]), IoSlice::new(&data[cut..end])]).unwrap().n;
                if n == 0 {
                    std::thread::yield_now();
                }
                sent += n;
            }
        });
        let r = Reader::new(Dir::B, BIG);
        let mut buf = vec![0u8; 200_000];
        let (mut got, mut k) = (0usize, 0usize);
        while got < total {
            k += 1;
            let want = 1 + (k * 70_001) % buf.len();
            let n = r.read(&m, &mut buf[..want]).unwrap().n;
            if n == 0 {
                std::thread::yield_now();
            }
            if let Some(i) = (0..n).find(|&i| buf[i] != byte(got + i)) {
                panic!("byte {} read as {} (want {})", got + i, buf[i], byte(got + i));
            }
            got += n;
        }
        writer.join().unwrap();
    }

    #[test]
    fn header_is_checked() {
        let (_fd, m) = region();
        check_header(&m, CAP).unwrap();
        assert!(check_header(&m, 2 * CAP).is_err(), "capacity other than announced");
        m.u32_at(0).store(0, Ordering::Relaxed);
        assert!(check_header(&m, CAP).is_err(), "bad magic");
        assert!(valid_capacity(4096) && valid_capacity(1 << 20));
        assert!(
            !valid_capacity(4095)
                && !valid_capacity(2048)
                && !valid_capacity(128 << 20)
                && !valid_capacity(0)
        );
    }

    #[test]
    fn the_two_rings_do_not_overlap() {
        let (_fd, m) = region();
        let (wa, wb) = (Writer::new(Dir::A, CAP), Writer::new(Dir::B, CAP));
        let (ra, rb) = (Reader::new(Dir::A, CAP), Reader::new(Dir::B, CAP));
        wa.write(&m, &[IoSlice::new(&[1; 4096])]).unwrap();
        wb.write(&m, &[IoSlice::new(&[2; 4096])]).unwrap();
        let mut buf = vec![0; 5000];
        assert_eq!(ra.read(&m, &mut buf).unwrap().n, 4096);
        assert!(buf[..4096].iter().all(|&b| b == 1));
        assert_eq!(rb.read(&m, &mut buf).unwrap().n, 4096);
        assert!(buf[..4096].iter().all(|&b| b == 2));
    }

    #[test]
    fn parked_flags_ask_for_a_wake_up_only_when_set() {
        let (_fd, m) = region();
        let (w, r) = (Writer::new(Dir::A, CAP), Reader::new(Dir::A, CAP));
        assert!(!w.write(&m, &[IoSlice::new(b"a")]).unwrap().wake, "busy reader: no system call");
        r.set_parked(&m, true);
        assert!(w.write(&m, &[IoSlice::new(b"b")]).unwrap().wake);
        r.set_parked(&m, false);
        w.write(&m, &[IoSlice::new(&[0; 4094])]).unwrap();
        assert_eq!(w.room(&m).unwrap(), 0);
        w.set_parked(&m, true);
        assert!(r.read(&m, &mut [0; 10]).unwrap().wake, "a writer waiting for room is woken");
        assert!(!w.reader_closed(&m));
        r.close(&m);
        assert!(w.reader_closed(&m));
    }

    proptest! {
        /// Whatever the sizes of writes and reads, the bytes come out in order, unchanged, and
        /// never more than the capacity is in flight.
        #[test]
        fn bytes_come_out_as_they_went_in(ops in prop::collection::vec((0usize..6000, 0usize..6000, 0usize..3), 1..60)) {
            let (_fd, m) = region();
            let (w, r) = (Writer::new(Dir::B, CAP), Reader::new(Dir::B, CAP));
            let (mut sent, mut got) = (Vec::new(), Vec::new());
            let mut counter = 0u8;
            for (wn, rn, parts) in ops {
                let data: Vec<u8> = (0..wn).map(|_| { counter = counter.wrapping_add(1); counter }).collect();
                let cut = if parts > 0 { wn / 2 } else { wn };
                let n = w.write(&m, &[IoSlice::new(&data[..cut]), IoSlice::new(&data[cut..])]).unwrap().n;
                sent.extend_from_slice(&data[..n]);
                counter = sent.last().copied().unwrap_or(0);
                prop_assert!(r.available(&m).unwrap() <= CAP as usize);
                if parts == 2 {
                    r.read_spare(&m, &mut got, rn).unwrap();
                } else {
                    let mut buf = vec![0; rn];
                    let k = r.read(&m, &mut buf).unwrap().n;
                    got.extend_from_slice(&buf[..k]);
                }
            }
            let mut rest = vec![0; CAP as usize];
            let k = r.read(&m, &mut rest).unwrap().n;
            got.extend_from_slice(&rest[..k]);
            prop_assert_eq!(got, sent);
        }

        /// A hostile peer writing any value into any control word or data byte: reads and
        /// writes either fail with a corrupt-ring error or move at most what fits; never a
        /// panic or an access outside the region.
        #[test]
        fn hostile_control_words_never_panic(pokes in prop::collection::vec((0usize..512, any::<u64>()), 1..40)) {
            let (_fd, m) = region();
            let (w, r) = (Writer::new(Dir::A, CAP), Reader::new(Dir::A, CAP));
            for (word, value) in pokes {
                // Any 8-byte word of the header page and the data areas.
                let off = (word * 8) % HEADER_LEN;
                m.u64_at(off).store(value, Ordering::Relaxed);
                m.u64_at(HEADER_LEN + (value as usize % (2 * CAP as usize)) / 8 * 8).store(value, Ordering::Relaxed);
                let mut buf = [0u8; 100];
                if let Ok(got) = r.read(&m, &mut buf) {
                    prop_assert!(got.n <= buf.len());
                }
                let mut v = Vec::new();
                if let Ok(got) = r.read_spare(&m, &mut v, 10_000) {
                    prop_assert!(got.n <= CAP as usize && v.len() == got.n);
                }
                if let Ok(wrote) = w.write(&m, &[IoSlice::new(&[7; 300])]) {
                    prop_assert!(wrote.n <= 300);
                }
                let _ = check_header(&m, CAP);
            }
        }
    }

    #[test]
    fn a_lying_index_is_a_corrupt_ring_error() {
        let (_fd, m) = region();
        let (w, r) = (Writer::new(Dir::A, CAP), Reader::new(Dir::A, CAP));
        m.u64_at(CTL_A + TAIL).store(u64::from(CAP) + 1, Ordering::Relaxed);
        let e = r.read(&m, &mut [0; 8]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("write index"), "{e}");
        m.u64_at(CTL_A + HEAD).store(5, Ordering::Relaxed); // ahead of anything written
        assert!(w.write(&m, &[IoSlice::new(b"x")]).is_err());
    }
}
