//! Ctrl-C, SIGTERM and SIGHUP, delivered to a callback on a small side thread.
//!
//! tokio's signal listener does the unsafe part (installing the handler, the self-pipe) once and
//! well; a current-thread runtime on one side thread waits on it, so the rest of the program
//! stays plain blocking code.

use std::future::poll_fn;
use std::sync::mpsc;
use std::task::Poll;

use tokio::signal::unix::{SignalKind, signal};

use crate::error::{CliError, CliResult};

/// Which signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
    /// SIGHUP (the terminal went away).
    Hangup,
}

impl Sig {
    /// The signal's usual name.
    pub fn name(self) -> &'static str {
        match self {
            Sig::Interrupt => "SIGINT",
            Sig::Terminate => "SIGTERM",
            Sig::Hangup => "SIGHUP",
        }
    }
}

/// Calls `on_signal(signal, n)` for the n-th (1, 2, ...) SIGINT, SIGTERM or SIGHUP from now on.
///
/// Returns once the handlers are installed, so a signal sent right after this returns is
/// already caught (never the default action of killing the process).
///
/// # Errors
///
/// A local error if the side thread or its runtime cannot be started.
pub fn on_terminate(on_signal: impl Fn(Sig, u32) + Send + 'static) -> CliResult {
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
    std::thread::Builder::new()
        .name("microcs-signals".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_io().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot start the signal listener: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let listeners = [SignalKind::interrupt(), SignalKind::terminate(), SignalKind::hangup()]
                    .map(|k| signal(k).map_err(|e| format!("cannot listen for signals: {e}")));
                let mut sigs = Vec::with_capacity(3);
                for (l, which) in listeners.into_iter().zip([Sig::Interrupt, Sig::Terminate, Sig::Hangup]) {
                    match l {
                        Ok(s) => sigs.push((s, which)),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(()));
                let mut n = 0;
                loop {
                    let which = poll_fn(|cx| {
                        for (s, which) in &mut sigs {
                            if s.poll_recv(cx).is_ready() {
                                return Poll::Ready(*which);
                            }
                        }
                        Poll::Pending
                    })
                    .await;
                    n += 1;
                    on_signal(which, n);
                }
            });
        })
        .map_err(|e| CliError::local(format!("cannot start the signal thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(CliError::local(e)),
        Err(_) => Err(CliError::local("the signal listener stopped while starting")),
    }
}
