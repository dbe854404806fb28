//! The command line, declared with clap's derive API: the doc comments below are the `--help` text.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The `--help` paragraph on NATS credentials.
macro_rules! nats_creds_help {
    () => {
        "NATS credentials come from the environment only (never from arguments, which `ps` \
         shows):\n  MICROCS_NATS_USER + MICROCS_NATS_PASSWORD, or MICROCS_NATS_TOKEN, or \
         MICROCS_NATS_CREDS (a .creds file);\n  MICROCS_NATS_CA: a PEM file of CA certificates for \
         tls:// URLs."
    };
}

/// The `--help` paragraph on NATS, shared by the commands that call services.
macro_rules! nats_env_help {
    () => {
        concat!(
            "With --nats URL (or $MICROCS_NATS_URL), a service with no local instance is reached over \
             that NATS server. ",
            nats_creds_help!()
        )
    };
}

/// Call local services by name: serve any program as a service, call it, list, ping, inspect and
/// benchmark services, all from the shell.
///
/// Services live in a private runtime directory ($MICROCS_RUNTIME_DIR, else
/// $XDG_RUNTIME_DIR/microcs, else /tmp/microcs-UID) and talk over Unix sockets. Across machines,
/// the same names work over a NATS server: `serve NAME --nats URL` there, `call NAME --nats URL`
/// (or $MICROCS_NATS_URL) anywhere.
#[derive(Debug, Parser)]
#[command(name = "microcs", version, propagate_version = true, max_term_width = 100)]
#[command(
    after_help = "Exit status: 0 success, 1 the request failed (remote error, timeout, no such service), 2 \
                         usage or local error.\n\nNew here? Run `microcs demo` for a guided tour (a few seconds, \
                         nothing to set up)."
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,

    /// Print machine-readable JSON on stdout instead of text (field names are stable; see docs/CLI.md).
    #[arg(long, global = true)]
    pub json: bool,

    /// Runtime directory where services are found and registered [default: $MICROCS_RUNTIME_DIR,
    /// else $XDG_RUNTIME_DIR/microcs, else /tmp/microcs-UID].
    #[arg(long, global = true, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a name: run CMD for each request (payload on its stdin, its stdout is the reply).
    ///
    /// Each request starts a fresh CMD (no shell) with the payload on stdin; what it writes to
    /// stdout is the reply. A non-zero exit is sent to the caller as an error carrying its stderr.
    /// CMD sees MICROCS_SERVICE, MICROCS_METHOD, MICROCS_REQUEST_ID, MICROCS_PEER_PID,
    /// MICROCS_PEER_UID and MICROCS_TIMEOUT_MS (time left before the caller gives up) in its
    /// environment. It runs in a process group of its own, which is killed when the caller's
    /// deadline passes or the caller cancels, and when CMD exits (so nothing it started in the
    /// background outlives the request).
    ///
    /// Ctrl-C or SIGTERM stops taking requests, frees the name at once, lets running requests
    /// finish (see --grace), and exits 0. A second Ctrl-C kills running commands and exits 130.
    ///
    /// With --nats URL the service is also a NATS micro service on that NATS server (callers on
    /// other machines reach it by the same name; several instances share the load); with
    /// --transport nats it is only there, and claims no local name.
    #[command(after_help = concat!("Examples:\n  microcs serve UPPER -- tr a-z A-Z\n  microcs serve ECHO --echo\n  \
                            microcs serve TOOLS --method wc='wc -c' --method date=date\n  \
                            microcs serve LIFE_GEN --life\n  \
                            microcs serve LIFE_GEN --life --instances 2\n  \
                            microcs serve UPPER --nats nats://broker:4222 -- tr a-z A-Z\n  \
                            microcs serve UPPER --nats nats://broker:4222 --transport nats -- tr a-z A-Z\n\n\
                            Over NATS, MICROCS_PEER_PID is 0 and MICROCS_PEER_UID 4294967295: no kernel \
                            vouches for a NATS caller.\n\n",
                            nats_creds_help!()))]
    Serve(ServeArgs),

    /// Send one request and print the raw reply on stdout.
    ///
    /// The payload is MESSAGE, or standard input when MESSAGE is `-`, or empty when MESSAGE is
    /// omitted. The reply's bytes are written to stdout exactly as received (no newline added);
    /// errors go to stderr.
    #[command(after_help = concat!(
        "Examples:\n  microcs call UPPER hello\n  \
         printf '.#.\\n.#.\\n.#.\\n' | microcs call LIFE_GEN -\n  \
         microcs call TOOLS --method wc 'count me'\n  \
         microcs call UPPER hello --nats nats://broker:4222\n\n",
        nats_env_help!()
    ))]
    Call(CallArgs),

    /// List the running services: name, where, pid, uptime, requests, errors, methods.
    ///
    /// Lists the services of the runtime directory and, with --nats URL (or $MICROCS_NATS_URL),
    /// the NATS micro services on that NATS server, one row per instance; WHERE says where each
    /// was found (local, nats, or local+nats for a local service also served on NATS).
    #[command(visible_alias = "list", after_help = nats_creds_help!())]
    Ls(LsArgs),

    /// Measure round trips to a service with its built-in $ping, like ping(8).
    #[command(after_help = nats_env_help!())]
    Ping(PingArgs),

    /// Show what a service says about itself ($info): version, description, endpoints.
    #[command(after_help = nats_env_help!())]
    Info(TargetArgs),

    /// Show a service's request and error counters per endpoint ($stats).
    #[command(after_help = nats_env_help!())]
    Stats(TargetArgs),

    /// Measure a service's latency percentiles and throughput under load.
    #[command(after_help = nats_env_help!())]
    Bench(BenchArgs),

    /// A guided tour: start a Game of Life service, call, list, ping and benchmark it, stop it.
    ///
    /// Runs in a private temporary runtime directory, so it never touches your services. Takes a
    /// few seconds.
    Demo(DemoArgs),

    /// Start a service from its definition (as its first call would), and wait until it serves.
    ///
    /// Definitions are TOML files NAME.toml in $MICROCS_SERVICES_DIR, else
    /// $XDG_CONFIG_HOME/microcs/services (~/.config/microcs/services); see docs/CLI.md.
    Start(ServiceArgs),

    /// Stop a running service: SIGTERM to each of its servers (instances), then wait until the
    /// name is free.
    Stop(ServiceArgs),

    /// Show a service's definition, whether it runs (each instance's pid), and its log.
    Status(ServiceArgs),

    /// Print a shell completion script (bash, zsh or fish) on stdout.
    #[command(
        after_help = "Examples:\n  microcs completions bash > ~/.local/share/bash-completion/completions/microcs\n  \
                            microcs completions zsh > ~/.zfunc/_microcs\n  \
                            microcs completions fish > ~/.config/fish/completions/microcs.fish"
    )]
    Completions(CompletionsArgs),
}

/// Arguments of `microcs serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Service name to claim (dot-separated tokens of letters, digits, '_' and '-').
    pub name: String,

    /// Program (and its arguments) that answers requests without a method; put it after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,

    /// Answer each request with its own payload (for testing).
    #[arg(long, conflicts_with_all = ["command", "life"])]
    pub echo: bool,

    /// Answer with a stream: each line CMD writes on stdout is sent as an item as soon as it is
    /// written (callers use `call --stream`); CMD is killed when the caller cancels or leaves.
    #[arg(long, requires = "command")]
    pub lines: bool,

    /// Serve Conway's Game of Life (what `microcs demo` runs): a board of '.' and '#' rows in,
    /// the next generation out; method `steps` takes "N\n" then a board and runs N generations;
    /// method `run` (a stream: `call --stream`) sends each of those N generations as it comes.
    #[arg(long, conflicts_with = "command")]
    pub life: bool,

    /// Add a method NAME that runs CMD with `sh -c` (payload on stdin, stdout is the reply);
    /// repeatable.
    #[arg(long = "method", short = 'm', value_name = "NAME=CMD", value_parser = parse_method)]
    pub methods: Vec<(String, String)>,

    /// Commands run at once, at most; further requests wait for a free slot (until their
    /// deadline) [default: the number of CPUs]. With --life: generations computed at once, at
    /// most (`--jobs 1`: one request at a time, as a service whose state is behind one lock)
    /// [default: no limit, each connection's requests on a thread of their own].
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub jobs: Option<u32>,

    /// On shutdown, how long running requests may take to finish before they are killed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,

    /// Description reported by `microcs info`.
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,

    /// Join NAME as one of several instances (callers are spread over them) instead of owning
    /// it alone. Instances and an exclusive server never serve one name together.
    #[arg(long, help_heading = "Instances")]
    pub shared: bool,

    /// Start and supervise N worker processes, each serving NAME as a shared instance (a
    /// worker that fails or is killed is restarted, with backoff; one that exits 0, idle or
    /// stopped, is not); Ctrl-C or SIGTERM stops them all, and the name is free once they have
    /// drained.
    #[arg(long, value_name = "N", help_heading = "Instances", conflicts_with = "shared",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub instances: Option<u32>,

    /// Stop (as on SIGTERM, exit 0) after this long without requests [default: none, or
    /// $MICROCS_IDLE_TIMEOUT seconds, which a service started from its definition gets].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,

    /// Serve on the listening socket systemd passed (socket activation: LISTEN_PID,
    /// LISTEN_FDS), which must be the name's socket: ListenStream=%t/microcs/NAME.sock in the
    /// .socket unit (docs/ACTIVATION.md has a unit to copy). Started without one (by hand), it
    /// binds the socket as usual. The socket stays when the service stops, so the next call
    /// starts it again (pair it with --idle-timeout).
    #[arg(long, conflicts_with_all = ["shared", "instances"])]
    pub socket_activation: bool,

    /// Offer shared memory to clients that ask for it (`--shm` on call/ping/bench, or
    /// MICROCS_SHM=1): their frames then move through rings in a sealed memfd instead of the
    /// socket (docs/PROTOCOL.md § 18) [default: off].
    #[arg(long)]
    pub shm: bool,

    /// Bytes of each of a shared-memory connection's two rings: a power of two from 4K to 64M
    /// (a larger frame still goes through, in ring-sized pieces) [default: 256K].
    #[arg(long, value_name = "SIZE", requires = "shm", value_parser = parse_size)]
    pub shm_ring: Option<u64>,

    /// Largest request or reply a command may take or give, in bytes (suffixes K, M accepted).
    #[arg(long, value_name = "BYTES", default_value = "16M", value_parser = parse_size)]
    pub max_size: u64,

    /// Also serve as a NATS micro service on the NATS server at URL (nats://host:4222,
    /// tls://host:4222, or a comma-separated list of one cluster's URLs). NAME must then have no
    /// dots. Not read from $MICROCS_NATS_URL: a service goes on a NATS server only when told so.
    #[arg(long, value_name = "URL", help_heading = "NATS")]
    pub nats: Option<String>,

    /// Where to serve: auto (the local socket, plus NATS with --nats), local (the local socket
    /// only), nats (NATS only, with --nats: no local name is claimed, so several instances may
    /// run on one machine).
    #[arg(long, value_name = "WHERE", value_enum, default_value_t = Way::Auto, hide_possible_values = true,
          help_heading = "NATS")]
    pub transport: Way,
}

/// `--nats` and `--transport` of the commands that call services.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "NATS")]
pub struct NatsArgs {
    /// Reach services that have no local instance over the NATS server at URL (nats://host:4222,
    /// tls://host:4222, or a comma-separated list of one cluster's URLs) [default:
    /// $MICROCS_NATS_URL].
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,

    /// How to reach services: auto (a local instance first, else NATS), local (local only), nats
    /// (NATS only) [default: $MICROCS_TRANSPORT, else auto].
    #[arg(long, value_name = "WAY", value_enum, hide_possible_values = true)]
    pub transport: Option<Way>,
}

/// Values of `--transport`: the library's [`microcs::nats::Transport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Way {
    /// Local first, else NATS (calls); the local socket, plus NATS when given (serve).
    #[default]
    Auto,
    /// The local socket only.
    Local,
    /// NATS only.
    Nats,
}

impl Way {
    /// The library's transport.
    pub fn transport(self) -> microcs::nats::Transport {
        match self {
            Way::Auto => microcs::nats::Transport::Auto,
            Way::Local => microcs::nats::Transport::Local,
            Way::Nats => microcs::nats::Transport::Nats,
        }
    }
}

/// Arguments of `microcs call`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// Service to call.
    pub name: String,

    /// Payload to send; `-` reads it from standard input; omitted sends an empty payload.
    #[arg(allow_hyphen_values = true)]
    pub message: Option<String>,

    /// Call this method instead of the default handler.
    #[arg(long, short = 'm', value_name = "NAME")]
    pub method: Option<String>,

    /// Give up after this long (e.g. 500ms, 2s, 1m); with --stream, the longest wait for each
    /// next item.
    #[arg(long, short = 't', value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Ask for a stream of replies and print each item as it arrives: one per line (a newline is
    /// added to an item that does not end with one), or one JSON object per line with --json.
    /// Ctrl-C (or a closed stdout) cancels the stream on the server.
    #[arg(long)]
    pub stream: bool,

    /// Move frames through shared memory when the service offers it (else the socket, silently)
    /// [default: $MICROCS_SHM, else off].
    #[arg(long)]
    pub shm: bool,

    /// NATS: `--nats URL`, `--transport`.
    #[command(flatten)]
    pub net: NatsArgs,
}

/// Arguments of `microcs ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// How long to wait for each service's counters before showing `-`, and for the answers of
    /// the services on NATS.
    #[arg(long, short = 't', value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Also list the NATS micro services on the NATS server at URL (microcs services and any
    /// other) [default: $MICROCS_NATS_URL].
    #[arg(long, value_name = "URL", help_heading = "NATS")]
    pub nats: Option<String>,

    /// What to list: auto (local services, plus NATS with a URL), local (local only), nats (NATS
    /// only) [default: $MICROCS_TRANSPORT, else auto].
    #[arg(long, value_name = "WAY", value_enum, hide_possible_values = true, help_heading = "NATS")]
    pub transport: Option<Way>,
}

/// Arguments of `microcs ping`.
#[derive(Debug, Args)]
pub struct PingArgs {
    /// Service to ping.
    pub name: String,

    /// Stop after this many pings; 0 pings until Ctrl-C.
    #[arg(long, short = 'c', value_name = "COUNT", default_value_t = 4)]
    pub count: u64,

    /// Wait this long between pings (0 sends the next at once).
    #[arg(long, short = 'i', value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,

    /// How long to wait for each reply.
    #[arg(long, short = 't', value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Print only the summary.
    #[arg(long, short = 'q')]
    pub quiet: bool,

    /// Move frames through shared memory when the service offers it (else the socket, silently)
    /// [default: $MICROCS_SHM, else off].
    #[arg(long)]
    pub shm: bool,

    /// NATS: `--nats URL`, `--transport`.
    #[command(flatten)]
    pub net: NatsArgs,
}

/// Arguments of `microcs info` and `microcs stats`.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Service to ask.
    pub name: String,

    /// Ask this instance (its slot, as `microcs ls` shows it) of a name served by several.
    #[arg(long, value_name = "SLOT")]
    pub instance: Option<u32>,

    /// Give up after this long.
    #[arg(long, short = 't', value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// NATS: `--nats URL`, `--transport`.
    #[command(flatten)]
    pub net: NatsArgs,
}

/// Arguments of `microcs start`, `stop` and `status`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// Service name.
    pub name: String,

    /// How long `stop` waits for the servers to exit before it fails.
    #[arg(long, short = 't', value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Arguments of `microcs bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Service to load.
    pub name: String,

    /// Concurrent clients, each with its own connection and one request in flight.
    #[arg(long, short = 'c', value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub clients: u32,

    /// Payload size in bytes (suffixes K, M accepted); ignored with --payload.
    #[arg(long, short = 's', value_name = "BYTES", default_value = "64", value_parser = parse_size)]
    pub size: u64,

    /// Send this text as every request's payload instead of --size bytes.
    #[arg(long, value_name = "TEXT")]
    pub payload: Option<String>,

    /// How long to measure.
    #[arg(long, short = 'd', value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Unmeasured requests per client before measuring (connections and caches warm up).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub warmup: u64,

    /// Call this method instead of the default handler (`$ping` measures the transport alone).
    #[arg(long, short = 'm', value_name = "NAME")]
    pub method: Option<String>,

    /// How long a single request may take before it counts as an error.
    #[arg(long, short = 't', value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Never draw the progress bar (it is drawn only when stderr is a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,

    /// Pin the clients to these CPUs (e.g. `1`, `0,1`, `0-3`): client i runs on the i-th CPU of
    /// the list, round robin. Pin the server too (e.g. `taskset -c 0 microcs serve ...`): on a
    /// small VM, same-CPU and cross-CPU round trips differ several times over.
    #[arg(long, value_name = "LIST", value_parser = parse_cpus)]
    pub cpus: Option<CpuList>,

    /// Move frames through shared memory when the service offers it (else the socket, silently)
    /// [default: $MICROCS_SHM, else off].
    #[arg(long)]
    pub shm: bool,

    /// NATS: `--nats URL`, `--transport`.
    #[command(flatten)]
    pub net: NatsArgs,
}

/// A list of CPU numbers, from `--cpus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// Parses a CPU list as `taskset -c` takes it: numbers and ranges separated by commas
/// (`1`, `0,2`, `0-3`, `0-1,4`).
pub fn parse_cpus(s: &str) -> Result<CpuList, String> {
    // The kernel's CPU set size (CPU_SETSIZE); larger numbers cannot be pinned to.
    const MAX_CPU: usize = 1024;
    let bad = || format!("invalid CPU list {s:?}: expected CPU numbers or ranges, e.g. 1, 0,2 or 0-3");
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<usize>(), b.trim().parse::<usize>()),
            None => (part.parse(), part.parse()),
        };
        let (lo, hi) = (lo.map_err(|_| bad())?, hi.map_err(|_| bad())?);
        if lo > hi {
            return Err(format!("invalid CPU range {part:?} in {s:?}: the first number must be the smaller"));
        }
        if hi >= MAX_CPU {
            return Err(format!("CPU {hi} in {s:?} is out of range (at most {})", MAX_CPU - 1));
        }
        cpus.extend(lo..=hi);
    }
    Ok(CpuList(cpus))
}

/// Arguments of `microcs demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the demo's benchmark runs.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub bench_duration: Duration,
}

/// Arguments of `microcs completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to generate completions for.
    pub shell: Shell,
}

/// Shells `microcs completions` knows.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shell {
    /// GNU Bash.
    Bash,
    /// Z shell.
    Zsh,
    /// fish.
    Fish,
}

/// Parses `NAME=CMD` for `serve --method`.
fn parse_method(s: &str) -> Result<(String, String), String> {
    let (name, cmd) =
        s.split_once('=').ok_or_else(|| format!("expected NAME=CMD (e.g. wc='wc -c'), got {s:?}"))?;
    if name.is_empty() {
        return Err(format!("the method name before '=' is empty in {s:?}"));
    }
    if cmd.trim().is_empty() {
        return Err(format!("the command after '=' is empty in {s:?}"));
    }
    Ok((name.to_owned(), cmd.to_owned()))
}

/// Parses a duration: a number with a unit `ns`, `us`, `ms`, `s`, `m` or `h` (`1.5s`, `250ms`),
/// or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected a number and a unit, e.g. 500ms, 2s, 1.5m"))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("invalid duration unit {other:?} in {s:?}: use ns, us, ms, s, m or h")),
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 365.0 * 86_400.0 {
        return Err(format!("duration {s:?} is too long (at most a year)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a byte count: a whole number with an optional suffix `K`/`KiB` (1024) or `M`/`MiB`
/// (1024²), case-insensitive.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a whole number of bytes, e.g. 64, 4K, 1M"))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        other => return Err(format!("invalid size unit {other:?} in {s:?}: use K or M")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpus("1"), Ok(CpuList(vec![1])));
        assert_eq!(parse_cpus("0,2"), Ok(CpuList(vec![0, 2])));
        assert_eq!(parse_cpus("0-3"), Ok(CpuList(vec![0, 1, 2, 3])));
        assert_eq!(parse_cpus("0-1, 4"), Ok(CpuList(vec![0, 1, 4])));
        for bad in ["", "a", "1,", "3-1", "-1", "1-", "5000"] {
            assert!(parse_cpus(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("10us"), Ok(Duration::from_micros(10)));
        for bad in ["", "s", "2 parsecs", "-1s", "1e9h", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64"), Ok(64));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        for bad in ["", "1.5K", "x", "12G", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn methods() {
        assert_eq!(parse_method("wc=wc -c"), Ok(("wc".into(), "wc -c".into())));
        assert_eq!(parse_method("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_method("nocmd").is_err());
        assert!(parse_method("=x").is_err());
        assert!(parse_method("x= ").is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
