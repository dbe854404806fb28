//! `microcs start|stop|status NAME`: services with a definition (activation), for people.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use microcs::activation::{self, Definition};
use microcs::{Name, ServiceInfo};
use serde::Serialize;

use crate::cli::ServiceArgs;
use crate::error::{CliError, CliResult};
use crate::output::{Ctx, print, print_json};

/// The servers of `name` running now (its exclusive server, or its instances).
fn running(ctx: &Ctx, name: &Name) -> CliResult<Vec<ServiceInfo>> {
    Ok(microcs::list_in(&ctx.dir)?.into_iter().filter(|s| &s.name == name).collect())
}

fn definition(name: &Name) -> CliResult<Definition> {
    activation::find(name)?.ok_or_else(|| {
        let dir = activation::services_dir()
            .map_or_else(|| "(no home directory)".to_owned(), |d| d.display().to_string());
        CliError::local(format!(
            "no service definition for '{name}': write {dir}/{name}.toml (see `microcs start --help`), or \
             start it by hand with `microcs serve`"
        ))
    })
}

/// `{"event":...,"name":...,"pids":[...]}` for `start` and `stop` with `--json`.
#[derive(Serialize)]
struct Done<'a> {
    event: &'static str,
    name: &'a str,
    pids: Vec<u32>,
}

/// Runs `microcs start`.
pub fn start(ctx: &Ctx, args: ServiceArgs) -> CliResult {
    let name = Name::new(&args.name)?;
    let def = definition(&name)?;
    let already = !running(ctx, &name)?.is_empty();
    if !already {
        activation::start(&ctx.dir, &def)?;
    }
    let pids: Vec<u32> = running(ctx, &name)?.iter().map(|s| s.pid).collect();
    note!(
        "microcs: '{name}' {} (pid {})",
        if already { "was already running" } else { "started" },
        pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
    );
    if ctx.json {
        print_json(&Done { event: if already { "running" } else { "started" }, name: name.as_str(), pids })?;
    }
    Ok(())
}

/// Runs `microcs stop`.
pub fn stop(ctx: &Ctx, args: ServiceArgs) -> CliResult {
    let name = Name::new(&args.name)?;
    let servers = running(ctx, &name)?;
    if servers.is_empty() {
        return Err(CliError::request(format!("'{name}' is not running (in {})", ctx.dir.display())));
    }
    let pids: Vec<u32> = servers.iter().map(|s| s.pid).collect();
    for &pid in &pids {
        if let Some(p) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
        }
    }
    let give_up = Instant::now() + args.timeout;
    while !running(ctx, &name)?.is_empty() {
        if Instant::now() >= give_up {
            return Err(CliError::request(format!(
                "'{name}' is still running {:?} after SIGTERM (pids {pids:?})",
                args.timeout
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    note!("microcs: stopped '{name}'; the name is free");
    if ctx.json {
        print_json(&Done { event: "stopped", name: name.as_str(), pids })?;
    }
    Ok(())
}

/// `microcs status --json`.
#[derive(Serialize)]
struct Status {
    name: String,
    /// The definition file, or null when there is none.
    definition: Option<String>,
    command: Option<Vec<String>>,
    instances: Option<u32>,
    idle_timeout_s: Option<f64>,
    start_timeout_s: Option<f64>,
    running: bool,
    pids: Vec<u32>,
    log: String,
}

/// Runs `microcs status`.
pub fn status(ctx: &Ctx, args: ServiceArgs) -> CliResult {
    let name = Name::new(&args.name)?;
    let def = activation::find(&name)?;
    let servers = running(ctx, &name)?;
    let log = activation::log_path(&ctx.dir, &name);
    let st = Status {
        name: name.to_string(),
        definition: def.as_ref().map(|d| d.path.display().to_string()),
        command: def.as_ref().map(|d| d.command.clone()),
        instances: def.as_ref().map(|d| d.instances),
        idle_timeout_s: def.as_ref().and_then(|d| d.idle_timeout).map(|t| t.as_secs_f64()),
        start_timeout_s: def.as_ref().map(|d| d.start_timeout.as_secs_f64()),
        running: !servers.is_empty(),
        pids: servers.iter().map(|s| s.pid).collect(),
        log: log.display().to_string(),
    };
    if ctx.json {
        return print_json(&st);
    }
    let mut s = String::new();
    let _ = writeln!(s, "{name}");
    match &def {
        Some(d) => {
            let _ = writeln!(s, "  definition: {}", d.path.display());
            let _ = writeln!(s, "  command:    {}", d.command.join(" "));
            if d.instances > 1 {
                let _ = writeln!(s, "  instances:  {}", d.instances);
            }
            if let Some(t) = d.idle_timeout {
                let _ = writeln!(s, "  idle:       stops after {t:?} without requests");
            }
        }
        None => {
            let _ = writeln!(s, "  definition: none (started by hand only)");
        }
    }
    let state = match servers.as_slice() {
        [] => "not running".to_owned(),
        [one] if one.instance.is_none() => format!("running, pid {}", one.pid),
        many => format!(
            "running, {} instances (pid {})",
            many.len(),
            many.iter().map(|s| s.pid.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let _ = writeln!(s, "  state:      {state}");
    if log.exists() {
        let _ = writeln!(s, "  log:        {}", log.display());
    }
    print(&s)
}
