//! The runtime behind the blocking API's NATS side.
//!
//! Started the first time a blocking client or server uses NATS, never otherwise: the local fast
//! path stays free of any runtime. One current-thread runtime, driven by one background thread
//! (`microcs-nats`), carries every NATS connection of the process; blocking handlers run on its
//! blocking pool. Blocking callers hand it a future and wait on a channel, so calling from any
//! thread is fine, including from inside another async runtime (where `block_on` would panic).
//!
//! The runtime is per process: threads do not survive `fork()`, so a child that uses NATS gets
//! a runtime (and thread) of its own, and the parent's copy is left untouched.

use std::future::Future;
use std::sync::Mutex;
use std::sync::mpsc;

use tokio::runtime::{Builder, Handle};

use crate::error::{Error, ErrorKind, Result};
use crate::fork;

/// The runtime's handle, with the process that started it.
static RUNTIME: Mutex<Option<(u32, Handle)>> = Mutex::new(None);

fn handle() -> Result<Handle> {
    let mut slot = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((owner, handle)) = slot.as_ref()
        && fork::is_current(*owner)
    {
        return Ok(handle.clone());
    }
    // None yet, or the parent's (after fork): its driving thread is gone in this process, and
    // dropping its handle here could touch that runtime's state, so it is left as it is.
    std::mem::forget(slot.take());
    let rt = Builder::new_current_thread()
        .enable_all()
        .thread_name("microcs-nats-blocking")
        .build()
        .map_err(|e| Error::io("cannot start the NATS runtime", e))?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("microcs-nats".into())
        // Runs for the rest of the process: the runtime is only ever driven here.
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(|e| Error::io("cannot start the NATS runtime thread", e))?;
    *slot = Some((fork::current(), handle.clone()));
    Ok(handle)
}

/// Runs `fut` on the NATS runtime and waits for its output on this thread.
pub(crate) fn run<F>(fut: F) -> Result<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    handle()?.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| Error::new(ErrorKind::Closed, "the NATS runtime stopped while a call was running"))
}

/// Spawns `fut` on the NATS runtime without waiting.
pub(crate) fn spawn<F>(fut: F) -> Result<tokio::task::JoinHandle<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    Ok(handle()?.spawn(fut))
}
