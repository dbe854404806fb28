//! The path from Rust threads (tokio tasks) to an asyncio event loop that never waits for the
//! GIL: work is pushed onto a queue and, when the queue stops being empty, one byte is written
//! to a socket pair whose other end the loop watches (`loop.add_reader`). The loop then takes the
//! whole queue in one callback — a burst of a thousand items costs one wake-up of the loop.
//! Used by `AsyncClient` (finished calls) and by servers with async handlers (requests to run).

use std::io::{ErrorKind as IoKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A queue of `T` for an event loop, with its wake-up socket pair.
pub(crate) struct Bridge<T> {
    /// The queue, and whether the bridge is closed (its loop is gone).
    queue: Mutex<(Vec<T>, bool)>,
    /// Written by the producers (one byte when the queue stops being empty).
    wake_tx: UnixStream,
    /// Watched by the loop (`add_reader`); drained before the queue is taken.
    wake_rx: UnixStream,
}

impl<T> Bridge<T> {
    pub(crate) fn new() -> std::io::Result<Bridge<T>> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(Bridge { queue: Mutex::new((Vec::new(), false)), wake_tx, wake_rx })
    }

    /// The descriptor the loop watches for reading.
    pub(crate) fn fd(&self) -> RawFd {
        self.wake_rx.as_raw_fd()
    }

    /// Queues `item` for the loop; `Err(item)` once the bridge is closed.
    pub(crate) fn push(&self, item: T) -> Result<(), T> {
        let was_empty = {
            let mut q = lock(&self.queue);
            if q.1 {
                return Err(item);
            }
            let was_empty = q.0.is_empty();
            q.0.push(item);
            was_empty
        };
        if was_empty {
            // A full socket buffer means a wake-up is already pending: nothing is lost.
            let _ = (&self.wake_tx).write(&[1]);
        }
        Ok(())
    }

    /// Takes everything queued. The wake-up bytes are read first, so a push that comes after
    /// the queue was taken always writes a new byte (it finds the queue empty).
    pub(crate) fn take(&self) -> Vec<T> {
        let mut buf = [0u8; 256];
        loop {
            match (&self.wake_rx).read(&mut buf) {
                Ok(n) if n == buf.len() => continue,
                Ok(_) => break,
                Err(e) if e.kind() == IoKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        std::mem::take(&mut lock(&self.queue).0)
    }

    /// Closes the bridge (its loop is gone): later pushes fail; returns what was still queued.
    pub(crate) fn close(&self) -> Vec<T> {
        let mut q = lock(&self.queue);
        q.1 = true;
        std::mem::take(&mut q.0)
    }
}
