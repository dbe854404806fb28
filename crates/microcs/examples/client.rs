//! Calls the service started by `cargo run --example server`.

use std::time::Duration;

use microcs::{Client, ErrorKind};

fn main() {
    let mut client = match Client::builder("TEXT_TOOLS").timeout(Duration::from_secs(5)).connect() {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::NoService => {
            eprintln!("{e}\nstart it first: cargo run --example server");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let mut run = || -> microcs::Result<()> {
        println!("{}", client.send_message("Give me some data back!!")?);
        println!("upper: {}", String::from_utf8_lossy(&client.call("upper", b"shout this")?));
        println!("words: {}", String::from_utf8_lossy(&client.call("words", b"one two three")?));
        let info = client.info()?;
        println!("{} v{}: {} endpoints", info.name, info.version, info.endpoints.len());
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
