//! `microcs call NAME [MESSAGE | -]`: one request, the raw reply on stdout.

use std::io::{Read, Write};
use std::time::Instant;

use serde::Serialize;

use crate::cli::CallArgs;
use crate::error::{CliError, CliResult};
use crate::net::Net;
use crate::output::{Ctx, base64, print_json, shm, via};

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

/// `--json --stream` output: one object per item, then one for the end.
#[derive(Serialize)]
struct ItemJson<'a> {
    /// The item's position, from 0.
    index: u64,
    /// The item as text when it is UTF-8, else null.
    item: Option<&'a str>,
    item_base64: String,
    bytes: usize,
    /// Since the call started.
    elapsed_us: u64,
}

/// The last line of `--json --stream`: how many items came and when the stream ended.
#[derive(Serialize)]
struct EndJson<'a> {
    name: &'a str,
    method: Option<&'a str>,
    end: bool,
    items: u64,
    elapsed_us: u64,
}

/// `microcs call --stream`: each item as it arrives.
fn stream(
    ctx: &Ctx,
    args: &CallArgs,
    client: &mut microcs::Client,
    payload: &[u8],
    t0: Instant,
) -> CliResult {
    let method = args.method.as_deref().unwrap_or("");
    let mut out = std::io::stdout().lock();
    let mut index = 0u64;
    for item in client.stream(method, payload)? {
        let item = item?;
        if ctx.json {
            let line = serde_json::to_string(&ItemJson {
                index,
                item: std::str::from_utf8(&item).ok(),
                item_base64: base64(&item),
                bytes: item.len(),
                elapsed_us: t0.elapsed().as_micros() as u64,
            })
            .map_err(|e| CliError::local(e.to_string()))?;
            writeln!(out, "{line}")?;
        } else {
            out.write_all(&item)?;
            if !item.ends_with(b"\n") {
                out.write_all(b"\n")?;
            }
        }
        // Each item as it comes, not when a buffer fills: a stream may be slow.
        out.flush()?;
        index += 1;
    }
    if ctx.json {
        let end = EndJson {
            name: &args.name,
            method: args.method.as_deref(),
            end: true,
            items: index,
            elapsed_us: t0.elapsed().as_micros() as u64,
        };
        writeln!(out, "{}", serde_json::to_string(&end).map_err(|e| CliError::local(e.to_string()))?)?;
    }
    out.flush()?;
    Ok(())
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
    let mut client = shm(ctx.client(&args.name, args.timeout, &net), args.shm).connect()?;
    if args.stream {
        return stream(ctx, &args, &mut client, &payload, t0);
    }
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
