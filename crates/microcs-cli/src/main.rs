//! `microcs`: call local services by name from the shell.
//!
//! Every command prints for people by default and JSON with `--json`; exits 0 on success, 1 when
//! the request failed, 2 on a usage or local error (see [`error::exit_code_for`]); and stops
//! quietly when its stdout is closed (`microcs ls | head -1`). The full reference is docs/CLI.md.
//!
//! # Layout
//!
//! - `cli`: the clap definition (its doc comments are the `--help` text).
//! - `cmd/<verb>.rs`: one module per subcommand; `cmd/bench/measure.rs` is the load loop.
//! - `error`: [`error::CliError`] and the single mapping from failures to exit codes.
//! - `exec`: running a command per request for `serve -- CMD`.
//! - `life`: the Game of Life the demo serves.
//! - `net`: `--nats URL` and `--transport` (checked, then handed to the library).
//! - `output`: JSON, tables, human numbers.
//! - `signals`: Ctrl-C / SIGTERM on a side thread.

/// Writes a line on stderr, ignoring failures: unlike `eprintln!`, it never panics when stderr is
/// closed (a server whose log reader went away must go on serving and shut down cleanly).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        // One write per line, so that the lines of processes sharing a terminal (the workers
        // of `serve --instances`) never interleave mid-line.
        let mut line = format!($($arg)*);
        line.push('\n');
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

mod cli;
mod cmd;
mod error;
mod exec;
mod life;
mod net;
mod output;
mod signals;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

use crate::cli::{Cli, Command};
use crate::error::{CliError, CliResult};
use crate::output::Ctx;

/// `--json` error object, printed on stdout when a command fails.
#[derive(Serialize)]
struct ErrorJson<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    /// The library's error kind (`"no service"`, `"timed out"`, ...), or null for CLI errors.
    kind: Option<&'static str>,
    /// The status code the service sent, for remote errors.
    code: Option<u16>,
    message: &'a str,
    exit_code: u8,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout with status 0; usage errors to stderr with status 2.
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { error::EXIT_LOCAL } else { error::EXIT_OK });
        }
    };
    let ctx =
        Ctx { json: cli.json, dir: cli.runtime_dir.clone().unwrap_or_else(microcs::registry::runtime_dir) };
    match run(&ctx, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&ctx, &e),
    }
}

fn run(ctx: &Ctx, command: Command) -> CliResult {
    match command {
        Command::Serve(a) => cmd::serve::run(ctx, a),
        Command::Call(a) => cmd::call::run(ctx, a),
        Command::Ls(a) => cmd::ls::run(ctx, a),
        Command::Ping(a) => cmd::ping::run(ctx, a),
        Command::Info(a) => cmd::inspect::info(ctx, a),
        Command::Stats(a) => cmd::inspect::stats(ctx, a),
        Command::Bench(a) => cmd::bench::run(ctx, a),
        Command::Demo(a) => cmd::demo::run(ctx, a),
        Command::Start(a) => cmd::service::start(ctx, a),
        Command::Stop(a) => cmd::service::stop(ctx, a),
        Command::Status(a) => cmd::service::status(ctx, a),
        Command::Completions(a) => cmd::completions::run(a),
    }
}

/// Prints a failure (one line on stderr; with `--json` also an object on stdout) and picks the
/// exit status.
fn report(ctx: &Ctx, e: &CliError) -> ExitCode {
    if let CliError::Failed { exit, kind, remote_code, message } = e {
        let _ = writeln!(std::io::stderr(), "microcs: error: {message}");
        if ctx.json {
            let _ = output::print_json(&ErrorJson {
                error: ErrorBody {
                    kind: kind.map(|k| k.as_str()),
                    code: *remote_code,
                    message,
                    exit_code: *exit,
                },
            });
        }
    }
    e.exit_code()
}
