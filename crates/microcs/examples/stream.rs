//! A streaming method: the server answers one request with many items, the client reads them
//! as they arrive, and dropping the stream part-way stops the server's side.
//!
//! ```text
//! cargo run --example stream
//! ```
//!
//! The server and the client are in this one process for the example's sake; across processes
//! it is the same code (`microcs call COUNTDOWN --method ticks --stream` reads it from a shell
//! while this runs).

use std::time::Duration;

use microcs::{Client, RemoteError, Request, Server};

fn main() -> Result<(), microcs::Error> {
    let handle = Server::builder("COUNTDOWN")
        // `client.stream("count", b"5")`: the items 5, 4, ..., 1, then the end.
        .stream_method("count", |req: Request| {
            let n: u32 = req.text()?.trim().parse().map_err(|_| RemoteError::new(400, "want a number"))?;
            Ok::<_, RemoteError>((1..=n).rev().map(|i| Ok::<_, RemoteError>(i.to_string())))
        })
        // An endless stream: the iterator runs only as fast as the caller reads (flow control),
        // and is dropped when the caller drops its stream.
        .stream_method("ticks", |_req: Request| {
            Ok::<_, RemoteError>((0u64..).map(|i| {
                std::thread::sleep(Duration::from_millis(100));
                Ok::<_, RemoteError>(format!("tick {i}"))
            }))
        })
        .bind()?
        .spawn(|req: Request| Ok::<_, RemoteError>(req.into_payload()))?;

    let mut client = Client::connect("COUNTDOWN")?;
    for item in client.stream("count", b"5")? {
        println!("count: {}", String::from_utf8_lossy(&item?));
    }
    // Three ticks, then the stream is dropped: the server stops producing.
    for item in client.stream("ticks", b"")?.take(3) {
        println!("{}", String::from_utf8_lossy(&item?));
    }
    // The same connection goes on with plain requests.
    println!("echo: {}", String::from_utf8_lossy(&client.request(b"done")?));
    handle.shutdown();
    Ok(())
}
