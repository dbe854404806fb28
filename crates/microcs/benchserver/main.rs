//! The server processes of the `e2e` bench (`benches/e2e.rs` starts them):
//!
//! ```text
//! microcs-bench-server KIND DIR CPU     # KIND: floor | blocking | tokio (feature `tokio`)
//! ```
//!
//! pins itself to CPU, serves the bench's services in the runtime directory DIR, prints
//! `READY`, and serves until its stdin closes. A program of its own, not a mode of the bench's
//! binary, so that what a server process costs (its resident memory above all: the pages of
//! its text that it touches, and those the kernel maps around them) is that of a program that
//! holds a server and nothing else, as an application's server would, not the bench's client,
//! statistics and report code as well.

use std::path::Path;

use microcs::{RemoteError, Request, Server};

#[path = "../benches/common/mod.rs"]
mod common;
use common::*;
// The floor's server half; its client half is the bench's.
#[allow(dead_code)]
#[path = "../benches/floor/mod.rs"]
mod floor;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, dir, cpu] = args.as_slice() else {
        eprintln!("usage: microcs-bench-server floor|blocking|tokio DIR CPU");
        std::process::exit(2);
    };
    serve(kind, Path::new(dir), cpu.parse().expect("CPU: a number"));
}

fn echo(r: Request) -> Result<Vec<u8>, RemoteError> {
    Ok(r.into_payload())
}

/// The count of a stream request (`items` method): its payload, a decimal number.
fn stream_count(r: &Request) -> Result<u64, RemoteError> {
    r.text()?.parse().map_err(|_| RemoteError::new(400, "want a count"))
}

/// Body of a server process: serves until its stdin closes.
fn serve(kind: &str, dir: &Path, cpu: usize) {
    pin(cpu);
    match kind {
        "floor" => {
            // A previous floor server of this directory left its socket behind.
            let _ = std::fs::remove_file(dir.join("floor.sock"));
            let _ = std::fs::remove_file(dir.join("floor-epoll.sock"));
            floor::serve(&dir.join("floor.sock"));
            floor::serve_epoll(&dir.join("floor-epoll.sock"));
            ready_then_wait_for_stdin();
        }
        "blocking" => {
            let h = Server::builder(BLOCKING_NAME)
                .max_frame(MAX_FRAME)
                .shared_memory(true)
                .bind()
                .unwrap()
                .stream_method("items", |r: Request| {
                    let n = stream_count(&r)?;
                    Ok::<_, RemoteError>((0..n).map(|_| Ok::<_, RemoteError>(ITEM.to_vec())))
                })
                .spawn(echo)
                .unwrap();
            let k = Server::builder(BLOCKING_KBUF_NAME)
                .max_frame(MAX_FRAME)
                .send_buffer(0)
                .bind()
                .unwrap()
                .spawn(echo)
                .unwrap();
            ready_then_wait_for_stdin();
            h.shutdown();
            k.shutdown();
        }
        #[cfg(feature = "tokio")]
        "tokio" => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let start = |name, send_buffer| async move {
                    microcs::tokio::Server::builder(name)
                        .max_frame(MAX_FRAME)
                        .send_buffer(send_buffer)
                        .shared_memory(true)
                        .bind()
                        .await
                        .unwrap()
                        .stream_method("items", |r: Request, items: microcs::tokio::Items| async move {
                            for _ in 0..stream_count(&r)? {
                                items.send(ITEM.to_vec()).await?;
                            }
                            Ok::<_, RemoteError>(())
                        })
                        .spawn(|r: Request| async move { echo(r) })
                        .unwrap()
                };
                let h = start(TOKIO_NAME, 1 << 20).await;
                let k = start(TOKIO_KBUF_NAME, 0).await;
                let (tx, rx) = tokio::sync::oneshot::channel();
                std::thread::spawn(move || {
                    ready_then_wait_for_stdin();
                    let _ = tx.send(());
                });
                let _ = rx.await;
                h.shutdown().await;
                k.shutdown().await;
            });
        }
        other => panic!("unknown server kind {other:?}"),
    }
}
