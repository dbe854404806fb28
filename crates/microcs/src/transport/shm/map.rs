//! The shared region's memory: creating, sealing, checking and mapping the memfd, and a
//! bounds-checked view of the mapping. This is the only `unsafe` code of the shared-memory
//! transport (PROTOCOL.md § 18.2, § 18.4).
//!
//! The peer may write any byte of the region at any time, so nothing here hands out a Rust
//! reference to plain bytes in it: control words are atomics (any bit pattern is a valid
//! integer), and data moves with raw copies into and out of memory this process owns. Offsets
//! are checked against the mapping's length on every access; a bad offset is a bug of the
//! caller (they are computed from validated, masked indices) and panics rather than touching
//! memory outside the mapping.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

/// The seals a region must carry before it is mapped: its size can never change.
pub(crate) const SEALS: SealFlags = SealFlags::SHRINK.union(SealFlags::GROW).union(SealFlags::SEAL);

/// A `MAP_SHARED` read-write mapping of a sealed memfd, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory valid for the struct's whole life; all access goes
// through atomics or raw copies (never `&`/`&mut` to its bytes), so sharing it between threads
// is no more than sharing it between processes, which the design already assumes.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// A new zero-filled region of `len` bytes: memfd, sized, sealed, mapped.
    pub(crate) fn create(len: usize) -> io::Result<(OwnedFd, Mapping)> {
        let fd = rustix::fs::memfd_create("microcs-shm", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        rustix::fs::fcntl_add_seals(&fd, SEALS)?;
        let map = Mapping::map(&fd, len)?;
        Ok((fd, map))
    }

    /// Maps a region received from the peer, after checking that it is sealed and exactly
    /// `len` bytes long (so it cannot shrink under us and fault our accesses).
    pub(crate) fn attach(fd: &OwnedFd, len: usize) -> io::Result<Mapping> {
        let seals = rustix::fs::fcntl_get_seals(fd)?;
        if !seals.contains(SEALS) {
            return Err(invalid(format!("shared memory is not sealed against resizing (seals {seals:?})")));
        }
        let size = rustix::fs::fstat(fd)?.st_size;
        if u64::try_from(size).ok() != Some(len as u64) {
            return Err(invalid(format!("shared memory is {size} bytes, expected {len}")));
        }
        Mapping::map(fd, len)
    }

    fn map(fd: impl AsFd, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(invalid("empty shared memory".into()));
        }
        // SAFETY: a new shared mapping at an address the kernel chooses, so it overlaps no memory
        // Rust knows about; the file is sealed at `len` bytes (checked or set by the callers), so
        // every byte of the mapping stays backed for as long as it is mapped.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| invalid("mmap returned null".into()))?;
        Ok(Mapping { ptr, len })
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn check(&self, off: usize, n: usize, align: usize) {
        assert!(
            off.checked_add(n).is_some_and(|end| end <= self.len) && off % align == 0,
            "shared-memory access out of bounds: {off}+{n} of {}",
            self.len
        );
    }

    /// The 64-bit control word at `off`.
    pub(crate) fn u64_at(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8, 8);
        // SAFETY: in bounds and 8-aligned (checked; the mapping is page-aligned), valid for
        // the lifetime of `&self`; any bit pattern is a valid `AtomicU64`, and the word is only
        // ever accessed atomically by both processes.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// The 32-bit control word at `off`.
    pub(crate) fn u32_at(&self, off: usize) -> &AtomicU32 {
        self.check(off, 4, 4);
        // SAFETY: as for `u64_at`, with 4-byte alignment.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU32>() }
    }

    /// Copies `dst.len()` bytes of the region from `off` into `dst`.
    pub(crate) fn copy_out(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len(), 1);
        // SAFETY: the source range is inside the mapping (checked) and the destination is
        // memory we own exclusively, so they do not overlap. The peer may be writing the
        // source meanwhile: the bytes copied are then arbitrary, which every `u8` value is
        // allowed to be; no reference to the shared bytes is created.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) }
    }

    /// Appends `n` bytes of the region from `off` to `v`.
    pub(crate) fn append_to(&self, off: usize, n: usize, v: &mut Vec<u8>) {
        self.check(off, n, 1);
        v.reserve(n);
        let len = v.len();
        // SAFETY: `reserve` made room for `n` more bytes after `len`; the source is inside the
        // mapping (checked) and cannot overlap the vector's own allocation. After the copy those
        // `n` bytes are initialised (arbitrary values are valid `u8`s), so the length may grow.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), v.as_mut_ptr().add(len), n);
            v.set_len(len + n);
        }
    }

    /// Copies `src` into the region at `off`.
    pub(crate) fn copy_in(&self, off: usize, src: &[u8]) {
        self.check(off, src.len(), 1);
        // SAFETY: the destination range is inside the mapping (checked), writable, and not
        // memory Rust holds a reference to; the source is ours and cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`, unmapped once; every reference handed out
        // borrows `self`, so none outlives it. Unmapping never writes the region (a forked child
        // drops its inherited copy this way without disturbing the parent's connection).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_region_is_shared_between_two_mappings_and_bounds_are_checked() {
        let (fd, a) = Mapping::create(8192).unwrap();
        let b = Mapping::attach(&fd, 8192).unwrap();
        a.u64_at(8).store(0x1122_3344_5566_7788, Ordering::Release);
        assert_eq!(b.u64_at(8).load(Ordering::Acquire), 0x1122_3344_5566_7788);
        a.copy_in(8190, b"xy");
        let mut got = [0; 2];
        b.copy_out(8190, &mut got);
        assert_eq!(&got, b"xy");
        let mut v = b"<".to_vec();
        b.append_to(8190, 2, &mut v);
        assert_eq!(v, b"<xy");
        for bad in [8191, usize::MAX - 1] {
            let r = std::panic::catch_unwind(|| b.copy_out(bad, &mut [0; 2]));
            assert!(r.is_err(), "out-of-bounds copy at {bad} is refused");
        }
        assert!(std::panic::catch_unwind(|| b.u32_at(2).load(Ordering::Relaxed)).is_err(), "misaligned");
    }

    #[test]
    fn the_seals_refuse_shrinking_and_growing() {
        let (fd, _map) = Mapping::create(8192).unwrap();
        assert!(rustix::fs::ftruncate(&fd, 4096).is_err(), "shrink refused");
        assert!(rustix::fs::ftruncate(&fd, 16384).is_err(), "grow refused");
        assert!(rustix::fs::fcntl_get_seals(&fd).unwrap().contains(SEALS));
    }

    #[test]
    fn attach_refuses_an_unsealed_or_wrongly_sized_region() {
        let fd = rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, 8192).unwrap();
        let e = Mapping::attach(&fd, 8192).unwrap_err();
        assert!(e.to_string().contains("not sealed"), "{e}");
        rustix::fs::fcntl_add_seals(&fd, SEALS).unwrap();
        let e = Mapping::attach(&fd, 4096).unwrap_err();
        assert!(e.to_string().contains("8192 bytes, expected 4096"), "{e}");
        assert!(Mapping::attach(&fd, 8192).is_ok());
    }
}
