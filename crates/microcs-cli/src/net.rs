//! `--nats URL` and `--transport`: checking them and handing them to the library.
//!
//! The library already reads `MICROCS_NATS_URL`, `MICROCS_TRANSPORT` and the credential variables
//! (`MICROCS_NATS_USER`/`PASSWORD`/`TOKEN`/`CREDS`/`CA`) for every client; the CLI passes its flags
//! on top and checks what only a command line can get wrong: a secret written in a URL given as an
//! argument (every user can read it from `ps`), and contradictory or incomplete flags.

use microcs::ClientBuilder;
use microcs::nats::{ENV_TRANSPORT, ENV_URL, Transport, redact_url, url_has_credentials};

use crate::cli::{NatsArgs, Way};
use crate::error::{CliError, CliResult};

/// How the calls of one command reach services.
#[derive(Debug, Clone, Default)]
pub struct Net {
    /// The URL given with `--nats` (checked); `None` leaves it to `MICROCS_NATS_URL`.
    pub url: Option<String>,
    /// `--transport`; `None` leaves it to `MICROCS_TRANSPORT`.
    pub transport: Option<Transport>,
}

impl Net {
    /// Local sockets only, whatever the environment says (for the demo and for `ls`'s own
    /// `$stats` calls to the local services it found).
    pub fn local() -> Net {
        Net { url: None, transport: Some(Transport::Local) }
    }

    /// Checks the flags of a command that calls services.
    ///
    /// # Errors
    ///
    /// A usage error (exit 2) for a URL with credentials in it, an empty URL, `--transport local`
    /// with `--nats`, NATS only without any URL, or an unknown `MICROCS_TRANSPORT`.
    pub fn from_args(args: &NatsArgs) -> CliResult<Net> {
        let transport = args.transport.map(Way::transport);
        if let Some(url) = &args.nats {
            check_url(url)?;
            if transport == Some(Transport::Local) {
                return Err(CliError::local(
                    "--transport local and --nats contradict each other (local calls never use NATS); drop one",
                ));
            }
        }
        let net = Net { url: args.nats.as_ref().map(|u| u.trim().to_owned()), transport };
        if net.effective_transport()? == Transport::Nats && net.effective_url().is_none() {
            return Err(CliError::local(format!(
                "NATS only (--transport nats or {ENV_TRANSPORT}=nats) needs a NATS URL: give --nats URL or \
                 set {ENV_URL}"
            )));
        }
        Ok(net)
    }

    /// The transport in force: `--transport`, else `MICROCS_TRANSPORT`, else auto.
    ///
    /// # Errors
    ///
    /// A usage error when `MICROCS_TRANSPORT` holds something else than auto, local or nats.
    pub fn effective_transport(&self) -> CliResult<Transport> {
        if let Some(t) = self.transport {
            return Ok(t);
        }
        match std::env::var(ENV_TRANSPORT) {
            Ok(v) => {
                Transport::parse(&v).map_err(|e| CliError::local(format!("{ENV_TRANSPORT}: {}", e.message())))
            }
            Err(_) => Ok(Transport::Auto),
        }
    }

    /// The NATS URL in force: `--nats`, else `MICROCS_NATS_URL` (as the library reads it).
    pub fn effective_url(&self) -> Option<String> {
        self.url.clone().or_else(env_url)
    }

    /// Applies the flags to a client builder (what they leave unset, the library takes from the
    /// environment).
    pub fn apply(&self, mut builder: ClientBuilder) -> ClientBuilder {
        if let Some(url) = &self.url {
            builder = builder.nats(url);
        }
        if let Some(t) = self.transport {
            builder = builder.transport(t);
        }
        builder
    }
}

/// `MICROCS_NATS_URL`, when set and not blank (the library ignores a blank one too).
pub fn env_url() -> Option<String> {
    std::env::var(ENV_URL).ok().map(|u| u.trim().to_owned()).filter(|u| !u.is_empty())
}

/// Checks a URL given on the command line: not blank, and no user, password or token in it.
///
/// # Errors
///
/// A usage error (exit 2) saying where credentials go instead. The message shows the URL with
/// its secret masked, never the secret.
pub fn check_url(url: &str) -> CliResult<()> {
    if url.trim().is_empty() {
        return Err(CliError::local(format!(
            "the NATS URL is empty; give one such as nats://127.0.0.1:4222 (or leave --nats out to use {ENV_URL})"
        )));
    }
    if url_has_credentials(url) {
        return Err(CliError::local(format!(
            "the NATS URL {} has credentials in it, and arguments are visible to every user (ps); give the \
             URL without them and put the credentials in the environment: MICROCS_NATS_USER and \
             MICROCS_NATS_PASSWORD, or MICROCS_NATS_TOKEN, or MICROCS_NATS_CREDS (a .creds file)",
            redact_url(url)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_secrets_are_refused_and_never_echoed() {
        assert!(check_url("nats://127.0.0.1:4222").is_ok());
        assert!(check_url("tls://broker.example:4222,nats://b2:4222").is_ok());
        assert!(check_url("127.0.0.1:4222").is_ok());
        for bad in
            ["nats://me:hunter2@h:4222", "nats://s3cr3t@h", "nats://h1,nats://u:hunter2@h2", "u:hunter2@h"]
        {
            let CliError::Failed { exit, message, .. } = check_url(bad).unwrap_err() else { panic!() };
            assert_eq!(exit, 2);
            assert!(!message.contains("hunter2") && !message.contains("s3cr3t"), "{message}");
            assert!(message.contains("MICROCS_NATS_PASSWORD"), "{message}");
        }
        assert!(check_url("  ").is_err());
    }

    #[test]
    fn contradictions_are_usage_errors() {
        let args = NatsArgs { nats: Some("nats://h:4222".into()), transport: Some(Way::Local) };
        assert!(Net::from_args(&args).is_err());
        let args = NatsArgs { nats: Some("nats://h:4222".into()), transport: Some(Way::Nats) };
        let net = Net::from_args(&args).unwrap();
        assert_eq!(net.effective_transport().unwrap(), Transport::Nats);
        assert_eq!(net.effective_url().as_deref(), Some("nats://h:4222"));
    }
}
