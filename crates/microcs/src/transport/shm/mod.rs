//! The shared-memory transport (PROTOCOL.md § 17).

// Wired into `Link` by the next commits.
#![allow(dead_code)]

pub(crate) mod map;
pub(crate) mod ring;
