//! `microcs call NAME [MESSAGE | -]`: one request, the raw reply on stdout.

use std::io::{Read, Write};
use std::time::Instant;

use serde::Serialize;

use crate::cli::CallArgs;
use crate::error::{CliError, CliResult};
use crate::net::Net;
use crate::output::{Ctx, base64, print_json, via};

/// `--json` output of `microcs call`.
#[derive(Serialize)]
struct CallJson<'a> {
    name: &'a str,
    method: Option<&'a str>,
    /// The reply as text when it is UTF-8, else null.
    reply: Option<&'a str>,
    /// The reply's bytes in base64 (always present, for binary replies).
    reply_base64: String,
    bytes: usize,
    elapsed_us: u64,
    /// Where the request went: `"local"` or `"nats"`.
    via: &'static str,
    /// The NATS server this call could use (password masked), or null when NATS was not set up.
    nats_url: Option<String>,
}

/// Runs `microcs call`.
pub fn run(ctx: &Ctx, args: CallArgs) -> CliResult {
    let payload = match args.message.as_deref() {
        None => Vec::new(),
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut buf)
                .map_err(|e| CliError::local(format!("cannot read the payload from standard input: {e}")))?;
            buf
        }
        Some(text) => text.as_bytes().to_vec(),
    };
    let net = Net::from_args(&args.net)?;
    let t0 = Instant::now();
    let mut client = ctx.client(&args.name, args.timeout, &net).connect()?;
    let reply = match args.method.as_deref() {
        Some(m) => client.call(m, &payload)?,
        None => client.request(&payload)?,
    };
    let elapsed = t0.elapsed();
    if ctx.json {
        print_json(&CallJson {
            name: &args.name,
            method: args.method.as_deref(),
            reply: std::str::from_utf8(&reply).ok(),
            reply_base64: base64(&reply),
            bytes: reply.len(),
            elapsed_us: elapsed.as_micros() as u64,
            via: via(&client),
            nats_url: client.nats_url(),
        })
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(&reply)?;
        out.flush()?;
        Ok(())
    }
}
