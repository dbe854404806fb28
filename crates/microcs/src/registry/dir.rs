//! The runtime directory: where it is, creating it, and refusing an unsafe one.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

/// The runtime directory this process uses, from the environment (not created or checked).
///
/// # Examples
///
/// ```
/// // SAFETY-free in a doctest: nothing else runs in this process.
/// unsafe { std::env::set_var("MICROCS_RUNTIME_DIR", "/tmp/my-services") };
/// assert_eq!(microcs::registry::runtime_dir(), std::path::PathBuf::from("/tmp/my-services"));
/// ```
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MICROCS_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return Path::new(&xdg).join("microcs");
    }
    PathBuf::from(format!("/tmp/microcs-{}", euid()))
}

pub(crate) fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Creates `dir` (mode 0700) if missing, then checks it is safe to use.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    match fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) => {
            return Err(Error::io(format_args!("cannot create runtime directory {}", dir.display()), e));
        }
    }
    check_dir(dir, true)
}

/// Client-side check of a runtime directory the application named explicitly (to reach another
/// user's service): any owner is accepted — naming the directory is trusting its owner — but it
/// must be a real directory that nobody else can write to, so no one could have planted an
/// impostor socket in it.
pub(crate) fn check_foreign_dir_exists(dir: &Path) -> Result<bool> {
    match fs::symlink_metadata(dir) {
        Ok(_) => check_dir(dir, false).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format_args!("cannot inspect runtime directory {}", dir.display()), e)),
    }
}

/// Checks that `dir` is a real directory, owned by this user, closed to everyone else.
/// `Ok(false)` when it does not exist.
pub(crate) fn check_dir_exists(dir: &Path) -> Result<bool> {
    match fs::symlink_metadata(dir) {
        Ok(_) => check_dir(dir, true).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format_args!("cannot inspect runtime directory {}", dir.display()), e)),
    }
}

fn check_dir(dir: &Path, own: bool) -> Result<()> {
    let md = fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format_args!("cannot inspect runtime directory {}", dir.display()), e))?;
    let refuse = |why: String| {
        Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "refusing to use runtime directory {} ({why}, owner uid {}, mode {:04o}); it must be a \
                 directory owned by uid {} with mode 0700 — fix it, or set MICROCS_RUNTIME_DIR to a \
                 private directory",
                dir.display(),
                md.uid(),
                md.mode() & 0o7777,
                euid()
            ),
        ))
    };
    if md.file_type().is_symlink() {
        return refuse("it is a symlink".into());
    }
    if !md.is_dir() {
        return refuse("it is not a directory".into());
    }
    if own && md.uid() != euid() {
        return refuse("it belongs to another user".into());
    }
    if own && md.mode() & 0o077 != 0 {
        return refuse("group or others have access".into());
    }
    if md.mode() & 0o022 != 0 {
        return refuse("group or others can write to it".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::registry::tempdir;

    #[test]
    fn creates_private_dir_and_refuses_open_ones() {
        let d = tempdir("dir");
        ensure_dir(&d).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        for mode in [0o755, 0o777, 0o710] {
            fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
            let e = ensure_dir(&d).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied);
            assert!(e.to_string().contains(&format!("{mode:04o}")), "{e}");
            assert!(e.to_string().contains(&d.display().to_string()), "{e}");
        }
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        let link = d.with_extension("link");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let e = ensure_dir(&link).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        fs::remove_file(&link).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }
}
