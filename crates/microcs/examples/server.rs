//! A service with a default handler and two methods.
//!
//! ```text
//! cargo run --example server            # serves TEXT_TOOLS until Ctrl-C / Enter
//! cargo run --example client            # in another terminal
//! ```

use std::io::Read;

use microcs::{RemoteError, Request, Server};

fn main() -> Result<(), microcs::Error> {
    let server = Server::builder("TEXT_TOOLS")
        .description("small text utilities")
        .version("1.0.0")
        // A method: `client.call("upper", ...)`.
        .method("upper", |req: Request| Ok::<_, RemoteError>(req.text()?.to_uppercase()))
        .method("words", |req: Request| {
            Ok::<_, RemoteError>(req.text()?.split_whitespace().count().to_string())
        })
        .bind()?;
    println!("serving '{}' at {}", server.name(), server.socket_path().display());
    // The default handler: `client.request(...)` / `client.send_message(...)`.
    let handle = server.spawn(|req: Request| {
        let who = req.peer();
        let text = req.text()?;
        Ok::<_, RemoteError>(format!("pid {} said {:?} ({} bytes)", who.pid, text, text.len()))
    })?;
    println!("press Enter (or close stdin) to stop");
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    handle.shutdown();
    println!("stopped; the name is free again");
    Ok(())
}
