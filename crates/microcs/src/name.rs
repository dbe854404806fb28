//! Validated service names.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, ErrorKind};

/// A validated service name: one or more dot-separated tokens of `[A-Za-z0-9_-]`, at most
/// [`Name::MAX_LEN`] bytes, not starting with `-`.
///
/// The rules keep a name usable everywhere it goes: as a file name in the runtime directory (no
/// `/`, no `..`, short enough for a socket path), on a command line (no leading `-`), and as a
/// NATS subject (dot-separated tokens).
///
/// # Examples
///
/// Valid names:
///
/// ```
/// use microcs::Name;
/// for ok in ["LIFE_GEN", "life-gen", "org.example.solver", "a", "v2_api"] {
///     assert_eq!(Name::new(ok).unwrap().as_str(), ok);
/// }
/// ```
///
/// Invalid names, each refused with an error that says what is allowed:
///
/// ```
/// use microcs::{ErrorKind, Name};
/// for bad in ["", "../x", "a/b", "a b", ".hidden", "a..b", "trailing.", "-flag", "é", "a\0b"] {
///     let err = Name::new(bad).unwrap_err();
///     assert_eq!(err.kind(), ErrorKind::InvalidName, "{bad:?}");
/// }
/// assert!(Name::new("x".repeat(65)).is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// Longest name, in bytes. Keeps `<runtime dir>/<name>.sock` within `sun_path` for the usual
    /// runtime directories.
    pub const MAX_LEN: usize = 64;

    /// Validates `name`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidName`], with a message naming the rule that was broken.
    pub fn new(name: impl Into<String>) -> Result<Name, Error> {
        let name = name.into();
        check(&name).map_err(|why| {
            Error::new(
                ErrorKind::InvalidName,
                format!(
                    "invalid service name {name:?}: {why}; a name is dot-separated tokens of \
                     letters, digits, '_' and '-', at most {} bytes (e.g. LIFE_GEN)",
                    Name::MAX_LEN
                ),
            )
        })?;
        Ok(Name(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > Name::MAX_LEN {
        return Err("it is too long");
    }
    if name.starts_with('-') {
        return Err("it starts with '-'");
    }
    for token in name.split('.') {
        if token.is_empty() {
            return Err("it has an empty token (leading, trailing or doubled '.')");
        }
        if !token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err("it contains a character other than letters, digits, '_', '-' and '.'");
        }
    }
    Ok(())
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = Error;
    fn from_str(s: &str) -> Result<Name, Error> {
        Name::new(s)
    }
}

impl TryFrom<&str> for Name {
    type Error = Error;
    fn try_from(s: &str) -> Result<Name, Error> {
        Name::new(s)
    }
}

impl TryFrom<String> for Name {
    type Error = Error;
    fn try_from(s: String) -> Result<Name, Error> {
        Name::new(s)
    }
}

impl TryFrom<&String> for Name {
    type Error = Error;
    fn try_from(s: &String) -> Result<Name, Error> {
        Name::new(s.as_str())
    }
}

impl TryFrom<&Name> for Name {
    type Error = Error;
    fn try_from(n: &Name) -> Result<Name, Error> {
        Ok(n.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn limits_are_exact() {
        assert!(Name::new("a".repeat(64)).is_ok());
        assert!(Name::new("a".repeat(65)).is_err());
        assert!(Name::new("a-b").is_ok());
        assert!(Name::new("a\nb").is_err());
        // A Cyrillic look-alike of "LIFE_GEN" is refused, not normalised.
        assert!(Name::new("LIFE_GЕN").is_err());
    }

    #[test]
    fn message_says_what_is_allowed() {
        let msg = Name::new("../x").unwrap_err().to_string();
        assert!(msg.contains("\"../x\"") && msg.contains("letters, digits"), "{msg}");
    }

    proptest! {
        #[test]
        fn valid_names_never_escape_the_directory(s in "\\PC{0,80}") {
            if let Ok(n) = Name::new(s.clone()) {
                prop_assert!(!n.as_str().contains('/'));
                prop_assert!(!n.as_str().contains(".."));
                prop_assert!(!n.as_str().starts_with('.') && !n.as_str().starts_with('-'));
                prop_assert!(n.as_str().len() <= Name::MAX_LEN);
            }
        }
    }
}
