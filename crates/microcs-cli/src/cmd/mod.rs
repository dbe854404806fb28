//! One module per subcommand.

pub mod bench;
pub mod call;
pub mod completions;
pub mod demo;
pub mod inspect;
pub mod ls;
pub mod ping;
pub mod serve;
pub mod service;
pub mod supervise;
