//! `microcs serve NAME -- CMD`: turn a program into a service.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use microcs::proto::status;
use microcs::{RemoteError, Request, Server, ShutdownTrigger};
use serde::Serialize;

use crate::cli::{ServeArgs, Way};
use crate::error::{CliError, CliResult};
use crate::exec::{InSlot, Program, Runner};
use crate::life;
use crate::net;
use crate::output::{Ctx, print_json};
use crate::signals::{self, Sig};

/// What the signal thread needs: the server's trigger once it exists, and the signal it caught.
struct Stop {
    trigger: Option<ShutdownTrigger>,
    caught: Option<Sig>,
}

type Handler = Box<dyn Fn(Request) -> Result<Vec<u8>, RemoteError> + Send + Sync>;
/// The items of the `--life` stream `run`.
type Items = Box<dyn Iterator<Item = Result<String, RemoteError>> + Send>;

/// `handler` for `req`, in one of the `--jobs` slots when `limit` is given (`--life --jobs N`).
fn in_slot<T>(
    limit: Option<&Runner>,
    req: Request,
    handler: impl FnOnce(Request) -> Result<T, RemoteError>,
) -> Result<T, RemoteError> {
    match limit {
        Some(r) => r.run_in_slot(req, handler),
        None => handler(req),
    }
}

/// `{"event":"ready",...}`, printed on stdout with `--json` once the service takes requests.
#[derive(Serialize)]
struct Ready<'a> {
    event: &'static str,
    name: &'a str,
    pid: u32,
    /// Null when serving on NATS only.
    socket: Option<String>,
    runtime_dir: String,
    /// `["local"]`, `["nats"]` or `["local", "nats"]`.
    #[serde(rename = "where")]
    found: Vec<&'static str>,
    /// The NATS server it serves on (password masked), or null.
    nats_url: Option<String>,
    handler: String,
    methods: Vec<String>,
    jobs: u32,
}

/// `{"event":"stopped",...}`, printed on stdout with `--json` after a graceful shutdown.
#[derive(Serialize)]
struct Stopped<'a> {
    event: &'static str,
    name: &'a str,
    signal: Option<&'static str>,
}

/// Runs `microcs serve`.
pub fn run(ctx: &Ctx, args: ServeArgs) -> CliResult {
    check_what(&args)?;
    check_ring(&args)?; // here too, so that `--instances` does not start workers that must fail
    if let Some(n) = args.instances {
        check_nats(&args)?;
        return crate::cmd::supervise::run(ctx, &args, n);
    }
    serve(ctx, args)
}

/// Checks there is something to serve, and that its program exists.
fn check_what(args: &ServeArgs) -> CliResult {
    let name = args.name.as_str();
    if args.command.is_empty() && !args.echo && !args.life && args.methods.is_empty() {
        return Err(CliError::local(format!(
            "nothing to serve: give a command after `--` (e.g. `microcs serve {name} -- cat`), or --echo, \
             --life or --method NAME=CMD"
        )));
    }
    if let Some(program) = args.command.first() {
        if find_program(program).is_none() {
            return Err(CliError::local(format!(
                "cannot find the program '{program}'{}; check the spelling, give its path, or install it",
                if program.contains('/') { "" } else { " in PATH" }
            )));
        }
    }
    Ok(())
}

/// Serves the name in this process.
fn serve(ctx: &Ctx, args: ServeArgs) -> CliResult {
    let name = args.name.as_str();
    let nats_url = check_nats(&args)?;
    let max_frame = u32::try_from(args.max_size)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| CliError::local("--max-size must be between 1 byte and 4G"))?;
    let ring = check_ring(&args)?;
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(4, |n| u32::try_from(n.get()).unwrap_or(4).max(1))
    });
    let runner = Arc::new(Runner::new(name, jobs, u64::from(max_frame)));

    // Signals are caught from before the name is claimed, so none can kill the process while it
    // owns the name without cleaning up. One that comes before the server exists is kept, and
    // acted on as soon as it does.
    let stop = Arc::new(Mutex::new(Stop { trigger: None, caught: None }));
    {
        let (stop, runner) = (stop.clone(), runner.clone());
        let name = name.to_owned();
        signals::on_terminate(move |sig, n| {
            if n == 1 {
                note!(
                    "microcs: {} received: stopping '{name}' (running requests may finish; Ctrl-C again \
                     to kill them)",
                    sig.name()
                );
                let mut s = stop.lock().unwrap_or_else(|p| p.into_inner());
                s.caught = Some(sig);
                if let Some(t) = &s.trigger {
                    t.shutdown();
                }
            } else {
                runner.kill_all();
                note!("microcs: killed the running commands of '{name}'; exiting");
                std::process::exit(130);
            }
        })?;
    }

    let mut builder = Server::builder(name)
        .runtime_dir(&ctx.dir)
        .grace_period(args.grace)
        .max_frame(max_frame)
        .metadata("served_by", "microcs serve")
        .version(env!("CARGO_PKG_VERSION"))
        .shared_memory(args.shm)
        .transport(args.transport.transport());
    if let Some(url) = &nats_url {
        builder = builder.nats(url);
    }
    if let Some(bytes) = ring {
        builder = builder.ring_capacity(bytes);
    }
    if args.shared {
        builder = builder.shared();
    }
    if let Some(t) = args.idle_timeout {
        builder = builder.idle_timeout(Some(t));
    }
    if args.socket_activation {
        builder = builder.socket_activation(true);
    }
    let handler_desc;
    let default: Handler = if args.echo {
        handler_desc = "echo".to_owned();
        Box::new(|req: Request| Ok(req.into_payload()))
    } else if args.life {
        handler_desc = "game of life".to_owned();
        // With --jobs, at most that many generations are computed at once (`--jobs 1`: one
        // request at a time, as a stateful service behind one lock); else one per request.
        let limit = args.jobs.map(|_| runner.clone());
        let (l1, l2) = (limit.clone(), limit.clone());
        builder = builder.method("steps", move |req| in_slot(l1.as_deref(), req, life::steps)).stream_method(
            "run",
            move |req: Request| match &l2 {
                Some(r) => {
                    let _slot = r.stream_slot(&req)?;
                    life::run(req).map(|items| Box::new(InSlot { items, _slot }) as Items)
                }
                None => life::run(req).map(|items| Box::new(items) as Items),
            },
        );
        Box::new(move |req| in_slot(limit.as_deref(), req, life::next_generation).map(String::into_bytes))
    } else if !args.command.is_empty() {
        let program = Program::Exec(args.command.clone());
        handler_desc =
            if args.lines { format!("{} (lines as a stream)", program.display()) } else { program.display() };
        let r = runner.clone();
        Box::new(move |req| r.run(&program, req))
    } else {
        handler_desc = "none".to_owned();
        let names: Vec<String> = args.methods.iter().map(|(m, _)| m.clone()).collect();
        let service = name.to_owned();
        Box::new(move |_req| {
            Err(RemoteError::new(
                status::NO_METHOD,
                format!(
                    "service '{service}' has no default handler; call one of its methods: {}",
                    names.join(", ")
                ),
            ))
        })
    };
    let description = args.description.clone().unwrap_or_else(|| match (args.echo, args.life) {
        (true, _) => "echoes every request".to_owned(),
        (_, true) => "Conway's Game of Life: send rows of '.' and '#', get the next generation".to_owned(),
        _ if args.lines => {
            format!("runs `{}` for each request and streams its output lines", args.command.join(" "))
        }
        _ => format!("runs `{handler_desc}` for each request"),
    });
    builder = builder.description(&description).metadata("handler", &handler_desc);
    for (method, line) in &args.methods {
        let program = Program::Shell(line.clone());
        let r = runner.clone();
        builder = builder.method(method, move |req| r.run(&program, req));
    }

    let server = builder.bind()?;
    {
        let mut s = stop.lock().unwrap_or_else(|p| p.into_inner());
        let t = server.shutdown_trigger();
        if s.caught.is_some() {
            t.shutdown(); // a signal came while binding: serve() returns at once, cleanly
        }
        s.trigger = Some(t);
    }
    if args.shared {
        watch_supervisor(server.shutdown_trigger());
    }
    let on_nats = args.transport == Way::Nats;
    let socket = (!on_nats).then(|| server.socket_path().display().to_string());
    let handle = if args.lines {
        let (program, r) = (Program::Exec(args.command.clone()), runner.clone());
        server.spawn_stream(move |req| r.run_lines(&program, req))?
    } else {
        server.spawn(default)?
    };
    let mut methods: Vec<String> = args.methods.iter().map(|(m, _)| m.clone()).collect();
    if args.life {
        methods.splice(0..0, ["steps".to_owned(), "run".to_owned()]);
    }
    let shown_url = nats_url.as_deref().map(microcs::nats::redact_url);
    let place = match (&socket, &shown_url) {
        (Some(sock), Some(url)) => format!("at {sock} and on NATS at {url}"),
        (Some(sock), None) => format!("at {sock}"),
        (None, Some(url)) => format!("on NATS at {url} only"),
        (None, None) => unreachable!("checked: NATS only has a URL"),
    };
    let at_once = if args.life && args.jobs.is_none() {
        "no limit on requests at once".to_owned()
    } else {
        format!("up to {jobs} at once")
    };
    note!(
        "microcs: serving '{name}' (pid {}) {place}: {handler_desc}{}; {at_once}. Ctrl-C to stop.",
        std::process::id(),
        if methods.is_empty() { String::new() } else { format!(", methods: {}", methods.join(", ")) },
    );
    let mut found = Vec::new();
    if socket.is_some() {
        found.push("local");
    }
    if shown_url.is_some() {
        found.push("nats");
    }
    if ctx.json {
        print_json(&Ready {
            event: "ready",
            name,
            pid: std::process::id(),
            socket,
            runtime_dir: ctx.dir.display().to_string(),
            found,
            nats_url: shown_url,
            handler: handler_desc.clone(),
            methods: methods.clone(),
            jobs,
        })?;
    }
    // An error: the server lost its name (its runtime files were removed and another server
    // owns it now); reported by main, with the local-error status.
    let served = handle.wait();
    handle.shutdown();
    served?;
    note!("microcs: stopped '{name}'; the name is free");
    if ctx.json {
        // The reader may be gone by now (a pipeline shutting down); that is no failure.
        let signal = stop.lock().unwrap_or_else(|p| p.into_inner()).caught.map(Sig::name);
        let _ = print_json(&Stopped { event: "stopped", name, signal });
    }
    let _ = std::io::stderr().flush();
    Ok(())
}

/// A worker of `serve --instances` (its supervisor's pid in the environment) stops when its
/// parent is no longer that supervisor (it died, even by SIGKILL): no orphan serves on.
fn watch_supervisor(trigger: ShutdownTrigger) {
    let Some(supervisor) =
        std::env::var(crate::cmd::supervise::ENV_SUPERVISOR).ok().and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    std::thread::spawn(move || {
        while rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) == Some(supervisor) {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        note!("microcs: the supervisor (pid {supervisor}) is gone; stopping");
        trigger.shutdown();
    });
}

/// Checks `--nats` and `--transport`; returns the URL to serve on NATS with, if any.
/// `--shm-ring`, checked as the library will (PROTOCOL.md § 18.7), but naming the option.
fn check_ring(args: &ServeArgs) -> CliResult<Option<u32>> {
    let Some(n) = args.shm_ring else { return Ok(None) };
    u32::try_from(n)
        .ok()
        .filter(|n| n.is_power_of_two() && (4096..=64 << 20).contains(n))
        .map(Some)
        .ok_or_else(|| CliError::local(format!("--shm-ring {n}: must be a power of two from 4K to 64M")))
}

fn check_nats(args: &ServeArgs) -> CliResult<Option<String>> {
    if let Some(url) = &args.nats {
        net::check_url(url)?;
    }
    match (args.transport, &args.nats) {
        (Way::Nats, None) => Err(CliError::local(
            "--transport nats serves on NATS only, so it needs --nats URL (MICROCS_NATS_URL is for callers \
             only: a service goes on a NATS server only when told so)",
        )),
        (Way::Local, Some(_)) => Err(CliError::local(
            "--transport local and --nats contradict each other (local serves on the local socket only); \
             drop one",
        )),
        (Way::Local, None) => Ok(None),
        (_, url) => Ok(url.as_ref().map(|u| u.trim().to_owned())),
    }
}

/// Where `program` would be found by exec: itself when it has a `/`, else the first executable
/// of that name in `PATH`.
fn find_program(program: &str) -> Option<PathBuf> {
    let executable =
        |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| executable(p))
}
