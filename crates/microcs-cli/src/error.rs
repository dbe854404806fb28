//! What can end a command, and the one place where failures become exit codes.

use std::fmt;
use std::io;
use std::process::ExitCode;

use microcs::ErrorKind;

/// Exit status when everything worked.
pub const EXIT_OK: u8 = 0;
/// Exit status when the request failed: remote error, timeout, no such service, broken connection.
pub const EXIT_REQUEST_FAILED: u8 = 1;
/// Exit status for usage errors and local failures (bad name, name taken, unsafe runtime dir, I/O).
pub const EXIT_LOCAL: u8 = 2;

/// Why a command stopped early.
#[derive(Debug)]
pub enum CliError {
    /// A failure to report: one line on stderr, and the given exit status.
    Failed {
        /// `EXIT_REQUEST_FAILED` or `EXIT_LOCAL`.
        exit: u8,
        /// The library's kind, when the failure came from it (for `--json` error objects).
        kind: Option<ErrorKind>,
        /// The status code the service sent, for remote errors.
        remote_code: Option<u16>,
        /// The line to print (without the `microcs: ` prefix).
        message: String,
    },
    /// Stdout was closed by the reader (`microcs ls | head -1`): stop quietly, exit 0.
    BrokenPipe,
}

/// The exit status for a failure of this kind. Every command maps library errors through here.
pub fn exit_code_for(kind: ErrorKind) -> u8 {
    match kind {
        // The request (or the service it needs) failed: the caller may retry or look at the service.
        ErrorKind::NoService
        | ErrorKind::StartFailed
        | ErrorKind::TimedOut
        | ErrorKind::Remote
        | ErrorKind::Closed
        | ErrorKind::Protocol
        | ErrorKind::FrameTooLarge => EXIT_REQUEST_FAILED,
        // Something about this invocation or this machine must change first.
        ErrorKind::InvalidName
        | ErrorKind::InvalidConfig
        | ErrorKind::NameTaken
        | ErrorKind::PermissionDenied
        | ErrorKind::Io => EXIT_LOCAL,
        // ErrorKind is non-exhaustive: a kind added later is treated as local until mapped here.
        _ => EXIT_LOCAL,
    }
}

impl CliError {
    /// A usage or local error (exit 2).
    pub fn local(message: impl Into<String>) -> CliError {
        CliError::Failed { exit: EXIT_LOCAL, kind: None, remote_code: None, message: message.into() }
    }

    /// A failed request that did not come from a library error (exit 1).
    pub fn request(message: impl Into<String>) -> CliError {
        CliError::Failed { exit: EXIT_REQUEST_FAILED, kind: None, remote_code: None, message: message.into() }
    }

    /// A local I/O failure, or a quiet stop when it is a closed stdout.
    pub fn io(context: impl fmt::Display, err: io::Error) -> CliError {
        if err.kind() == io::ErrorKind::BrokenPipe {
            return CliError::BrokenPipe;
        }
        CliError::local(format!("{context}: {err}"))
    }

    /// The exit status.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Failed { exit, .. } => ExitCode::from(*exit),
            CliError::BrokenPipe => ExitCode::from(EXIT_OK),
        }
    }
}

impl From<microcs::Error> for CliError {
    fn from(e: microcs::Error) -> CliError {
        let kind = e.kind();
        let mut message = e.to_string();
        // Name the next step for failures whose library message cannot know the command line.
        match kind {
            ErrorKind::NoService if message.contains("on NATS") && !message.contains("microcs ls") => {
                message.push_str(
                    "; start it with `microcs serve NAME --nats URL`, or see the services there with \
                     `microcs ls --nats URL`",
                );
            }
            ErrorKind::NoService if !message.contains("microcs ls") && !message.contains("microcs start") => {
                message
                    .push_str("; start it with `microcs serve`, or see running services with `microcs ls`");
            }
            ErrorKind::TimedOut if !message.contains("--timeout") => {
                message.push_str("; a longer --timeout may help");
            }
            _ => {}
        }
        CliError::Failed {
            exit: exit_code_for(kind),
            kind: Some(kind),
            remote_code: e.remote().map(microcs::RemoteError::code),
            message,
        }
    }
}

/// Writing to stdout: a closed pipe means stop quietly, anything else is a local error.
impl From<io::Error> for CliError {
    fn from(e: io::Error) -> CliError {
        CliError::io("cannot write output", e)
    }
}

impl From<serde_json::Error> for CliError {
    fn from(e: serde_json::Error) -> CliError {
        match e.io_error_kind() {
            Some(io::ErrorKind::BrokenPipe) => CliError::BrokenPipe,
            _ => CliError::local(format!("cannot write JSON output: {e}")),
        }
    }
}

/// Result of a command.
pub type CliResult<T = ()> = Result<T, CliError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_failures_exit_1_local_failures_exit_2() {
        for k in [ErrorKind::NoService, ErrorKind::TimedOut, ErrorKind::Remote, ErrorKind::Closed] {
            assert_eq!(exit_code_for(k), 1, "{k}");
        }
        for k in [
            ErrorKind::InvalidName,
            ErrorKind::InvalidConfig,
            ErrorKind::NameTaken,
            ErrorKind::PermissionDenied,
            ErrorKind::Io,
        ] {
            assert_eq!(exit_code_for(k), 2, "{k}");
        }
    }

    #[test]
    fn broken_pipe_is_quiet() {
        let e = CliError::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(matches!(e, CliError::BrokenPipe));
        assert_eq!(e.exit_code(), ExitCode::from(0));
    }
}
