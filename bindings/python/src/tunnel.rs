//! Tunnel handles: `Opening` (a request under way), `Tunnel` (an open tunnel) and
//! `Closing` (a close under way).

use std::sync::{Mutex, PoisonError};

use portferry::{Error, Tunnel};
use pyo3::prelude::*;

use crate::errors::Failure;
use crate::process::ProcessBound;
use crate::runtime::{Task, Waited};

/// A tunnel being asked for. Dropping it cancels the request (or closes the tunnel, if
/// the answer came meanwhile).
#[pyclass(module = "portferry._native", frozen)]
pub(crate) struct Opening {
    task: Task<Tunnel>,
    port: u16,
}

impl Opening {
    pub(crate) fn new(task: Task<Tunnel>, port: u16) -> Self {
        Opening { task, port }
    }
}

#[pymethods]
impl Opening {
    /// Waits, without the GIL, up to `timeout` seconds (forever if `None`); the open
    /// tunnel, or `None` if the answer has not come yet. Raises the request's error.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<NativeTunnel>> {
        Ok(match self.task.wait(py, timeout)? {
            Waited::Done(tunnel) => Some(NativeTunnel::new(tunnel)),
            Waited::Pending => None,
        })
    }

    /// Cancels the request; a thread waiting for it gets an error at once.
    fn cancel(&self, py: Python<'_>) {
        self.task.cancel(py);
    }

    /// The local port asked for.
    #[getter]
    fn port(&self) -> u16 {
        self.port
    }
}

/// An open tunnel. Dropping it closes the tunnel without waiting; `close()` waits for
/// the relay to confirm.
#[pyclass(module = "portferry._native", name = "Tunnel", frozen)]
pub(crate) struct NativeTunnel {
    /// Locked only by attached threads, never across a wait.
    state: Mutex<TunnelState>,
    port: u16,
}

struct TunnelState {
    /// `None` once closed.
    tunnel: ProcessBound<Option<Tunnel>>,
    /// What the tunnel said last: what a closed one (or the parent's, in a forked
    /// child) reports.
    last: Endpoints,
}

/// A tunnel's public endpoints.
#[derive(Clone)]
struct Endpoints {
    url: String,
    tls_socket: (String, u16),
    tcp_socket: Option<(String, u16)>,
}

impl Endpoints {
    fn of(tunnel: &Tunnel) -> Self {
        let (host, port) = tunnel.tls_socket();
        Endpoints {
            url: tunnel.url().to_owned(),
            tls_socket: (host.to_owned(), port),
            tcp_socket: tunnel
                .tcp_socket()
                .ok()
                .map(|(host, port)| (host.to_owned(), port)),
        }
    }
}

impl NativeTunnel {
    fn new(tunnel: Tunnel) -> Self {
        NativeTunnel {
            port: tunnel.port(),
            state: Mutex::new(TunnelState {
                last: Endpoints::of(&tunnel),
                tunnel: ProcessBound::new(Some(tunnel)),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TunnelState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The endpoints as the tunnel reports them now, or last did.
    fn endpoints(&self) -> Endpoints {
        let mut state = self.state();
        if let Some(Some(tunnel)) = state.tunnel.get() {
            state.last = Endpoints::of(tunnel);
        }
        state.last.clone()
    }
}

#[pymethods]
impl NativeTunnel {
    /// The public URL, `https://<host>`, with `:<port>` unless the port is 443.
    #[getter]
    fn url(&self) -> String {
        self.endpoints().url
    }

    /// `(host, port)` of the TLS endpoint.
    #[getter]
    fn tls_socket(&self) -> (String, u16) {
        self.endpoints().tls_socket
    }

    /// `(host, port)` of the raw TCP endpoint; raises unless forwarded `unencrypted`.
    #[getter]
    fn tcp_socket(&self) -> PyResult<(String, u16)> {
        self.endpoints()
            .tcp_socket
            .ok_or_else(|| Failure::from(Error::NotUnencrypted).into())
    }

    /// The forwarded local port.
    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// Whether the tunnel is open in this process: `False` once closed, and in a
    /// forked child (the tunnel is the parent's).
    #[getter]
    fn is_open(&self) -> bool {
        self.state().tunnel.get().is_some_and(Option::is_some)
    }

    /// Closes the tunnel: it stops serving at once; the returned `Closing` waits for the
    /// relay to confirm. `None` if already closed, or in a forked child (where the
    /// tunnel is the parent's and is left alone).
    fn close(&self) -> PyResult<Option<Closing>> {
        let mut state = self.state();
        let Some(tunnel) = state.tunnel.get_mut().and_then(Option::take) else {
            return Ok(None);
        };
        state.last = Endpoints::of(&tunnel);
        Ok(Some(Closing(Task::spawn(tunnel.close())?)))
    }
}

/// A close under way: waits for the relay's confirmation.
#[pyclass(module = "portferry._native", frozen)]
pub(crate) struct Closing(Task<()>);

#[pymethods]
impl Closing {
    /// Waits, without the GIL, up to `timeout` seconds (forever if `None`); whether the
    /// relay has confirmed. Raises if it cannot.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        Ok(matches!(self.0.wait(py, timeout)?, Waited::Done(())))
    }

    /// Stops waiting for the confirmation (the tunnel is closed anyway).
    fn cancel(&self, py: Python<'_>) {
        self.0.cancel(py);
    }
}
