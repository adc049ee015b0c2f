//! The parts of the `portferry` command: its flags, and one file per subcommand that
//! runs for long.

pub(crate) mod args;
pub(crate) mod forward;
pub(crate) mod relay;
pub(crate) mod signals;
