//! The crate's errors as Python exceptions. Each error has a kind (a short name); the
//! Python package registers one exception class per kind (`portferry/errors.py`), so
//! that the classes and their hierarchy live in Python.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};

/// The exception classes by kind, as `portferry.errors` registers them.
static CLASSES: PyOnceLock<Py<PyDict>> = PyOnceLock::new();

/// Registers the exception class of each kind (called once, by `portferry.errors`).
#[pyfunction]
pub(crate) fn set_error_classes(py: Python<'_>, classes: Bound<'_, PyDict>) -> PyResult<()> {
    CLASSES
        .set(py, classes.unbind())
        .map_err(|_| pyo3::exceptions::PyRuntimeError::new_err("error classes already set"))
}

/// An error on its way to Python: its kind and message.
#[derive(Debug)]
pub(crate) struct Failure {
    kind: &'static str,
    message: String,
}

impl Failure {
    /// An object made by the parent of this forked process was used in the child.
    pub(crate) fn forked() -> Self {
        Failure {
            kind: "forked",
            message: "this object belongs to the process that forked this one: \
                      forward again in this process (its tunnels go on in the parent)"
                .into(),
        }
    }

    /// An argument that cannot be used.
    pub(crate) fn invalid(message: String) -> Self {
        Failure {
            kind: "invalid",
            message,
        }
    }

    /// The outcome of a request was already taken.
    pub(crate) fn gone() -> Self {
        Failure {
            kind: "error",
            message: "this request's outcome was already delivered".into(),
        }
    }

    /// The request was cancelled before it finished.
    pub(crate) fn cancelled() -> Self {
        Failure {
            kind: "cancelled",
            message: "the request was cancelled".into(),
        }
    }
}

impl From<portferry::Error> for Failure {
    fn from(error: portferry::Error) -> Self {
        use portferry::Error as E;
        let kind = match &error {
            E::InvalidPort { .. } => "invalid_port",
            E::PortAlreadyForwarded(_) => "port_already_forwarded",
            E::H2RequiresTls | E::NotUnencrypted | E::InvalidConfig { .. } => "invalid",
            E::NotConfigured { .. } => "not_configured",
            E::RelayUnreachable { .. } => "relay_unreachable",
            E::RelayTls { .. } => "relay_tls",
            E::Unauthorized => "token_refused",
            E::VersionMismatch { .. } => "version_mismatch",
            E::LimitReached { .. } => "limit_reached",
            E::Refused { .. } => "refused",
            E::Timeout { .. } => "timeout",
            E::LinkClosed => "link_closed",
            _ => "error",
        };
        Failure {
            kind,
            message: error.to_string(),
        }
    }
}

impl From<Failure> for PyErr {
    fn from(failure: Failure) -> Self {
        Python::attach(|py| {
            let class = CLASSES
                .get(py)
                .and_then(|classes| {
                    let classes = classes.bind(py);
                    let class = classes.get_item(failure.kind).ok().flatten();
                    class.or_else(|| classes.get_item("error").ok().flatten())
                })
                .and_then(|class| class.cast_into::<PyType>().ok());
            match class {
                Some(class) => PyErr::from_type(class, failure.message),
                None => pyo3::exceptions::PyRuntimeError::new_err(failure.message),
            }
        })
    }
}
