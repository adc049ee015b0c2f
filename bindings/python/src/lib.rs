//! The native half of the `portferry` Python package: the private module
//! `portferry._native`, which drives the agent library from Python. The public API
//! (`portferry.forward`, `Tunnel`, `Agent`, the exceptions) is Python, in
//! `python/portferry/`, and wraps what this module offers:
//!
//! - `Agent(relay, token, relay_ca)` and its `forward(port, unencrypted, h2)`, which
//!   returns an `Opening` at once (`agent`);
//! - `Opening.wait(timeout)` → `Tunnel`, `Tunnel.close()` → `Closing` (`tunnel`): every
//!   wait releases the GIL and is bounded by `timeout`, so Python waits in slices and
//!   Ctrl-C interrupts it between them;
//! - one tokio runtime per process, for every call and thread (`runtime`), remade in a
//!   forked child, which never touches the parent's (`process`);
//! - exceptions by kind, classes registered from Python (`errors`);
//! - `tracing` events queued for Python's `logging` (`logs`).

mod agent;
mod errors;
mod logs;
mod process;
mod runtime;
mod tunnel;

use pyo3::prelude::*;

/// The module `portferry._native`.
#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    logs::install();
    module.add_class::<agent::NativeAgent>()?;
    module.add_class::<tunnel::Opening>()?;
    module.add_class::<tunnel::NativeTunnel>()?;
    module.add_class::<tunnel::Closing>()?;
    module.add_function(wrap_pyfunction!(agent::check_forward, module)?)?;
    module.add_function(wrap_pyfunction!(errors::set_error_classes, module)?)?;
    module.add_function(wrap_pyfunction!(logs::set_log_level, module)?)?;
    module.add_function(wrap_pyfunction!(logs::take_log_records, module)?)?;
    Ok(())
}
