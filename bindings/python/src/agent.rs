//! `Agent`: one relay (address, token, CA), connected on first use; every tunnel
//! forwarded through it shares its one link.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use portferry::agent::{ENV_RELAY, ENV_TOKEN};
use portferry::{Agent, AgentConfig, Error, ForwardOptions, ProxyProtocol, Token};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt};
use tokio::sync::OnceCell;

use crate::errors::Failure;
use crate::process::ProcessBound;
use crate::runtime::Task;
use crate::tunnel::Opening;

/// A relay to forward through; connects when the first tunnel is asked for.
#[pyclass(module = "portferry._native", name = "Agent", frozen)]
pub(crate) struct NativeAgent {
    config: AgentConfig,
    /// The connected agent of this process; a forked child connects its own.
    ///
    /// Locked only by threads attached to the interpreter and never across a wait, so
    /// no thread holds it when `os.fork()` runs (the forking thread is attached).
    connection: Mutex<ProcessBound<Arc<OnceCell<Agent>>>>,
}

#[pymethods]
impl NativeAgent {
    /// An agent for the relay at `relay` (`host:port`) with `token`, trusting the CA
    /// certificates in the PEM file `relay_ca` (else the built-in web roots). A missing
    /// or empty relay or token is the error "no relay configured", naming the
    /// environment variables that would give them. The timeouts, in seconds, bound
    /// connecting (each of TCP, TLS and the relay's welcome) and each request; the
    /// crate's defaults if `None`.
    #[new]
    #[pyo3(signature = (relay, token, relay_ca=None, connect_timeout=None, request_timeout=None))]
    fn new(
        relay: Option<String>,
        token: Option<String>,
        relay_ca: Option<PathBuf>,
        connect_timeout: Option<f64>,
        request_timeout: Option<f64>,
    ) -> PyResult<Self> {
        let given = |value: Option<String>| value.filter(|value| !value.is_empty());
        let (relay, token) = match (given(relay), given(token)) {
            (Some(relay), Some(token)) => (relay, token),
            (relay, token) => {
                let missing = [(ENV_RELAY, relay.is_none()), (ENV_TOKEN, token.is_none())]
                    .into_iter()
                    .filter_map(|(name, absent)| absent.then_some(name))
                    .collect();
                return Err(Failure::from(Error::NotConfigured { missing }).into());
            }
        };
        let mut config = AgentConfig::new(relay, Token::new(token));
        config.relay_ca = relay_ca.filter(|path| !path.as_os_str().is_empty());
        if let Some(seconds) = connect_timeout {
            config.connect_timeout = duration(seconds)?;
        }
        if let Some(seconds) = request_timeout {
            config.request_timeout = duration(seconds)?;
        }
        Ok(NativeAgent {
            config,
            connection: Mutex::new(ProcessBound::new(Arc::default())),
        })
    }

    /// Asks the relay for a tunnel to the local `port`; returns at once, with the
    /// request under way. Raises at once what `check_forward` raises.
    #[pyo3(signature = (port, unencrypted=false, h2=false, proxy_protocol=None))]
    fn forward(
        &self,
        port: &Bound<'_, PyAny>,
        unencrypted: bool,
        h2: bool,
        proxy_protocol: Option<&str>,
    ) -> PyResult<Opening> {
        let port = check_forward(port, unencrypted, h2, proxy_protocol)?;
        let connection = self.connection_here();
        let config = self.config.clone();
        let options = ForwardOptions::new()
            .unencrypted(unencrypted)
            .h2(h2)
            .proxy_protocol(proxy_protocol.and_then(ProxyProtocol::parse));
        let task = Task::spawn(async move {
            let agent = connection
                .get_or_try_init(|| Agent::connect(config))
                .await?;
            agent.forward_with(port, options).await
        })?;
        Ok(Opening::new(task, port))
    }

    /// The relay's agent endpoint, `host:port`.
    #[getter]
    fn relay(&self) -> &str {
        &self.config.relay
    }

    fn __repr__(&self) -> String {
        format!("<portferry._native.Agent relay={:?}>", self.config.relay)
    }
}

impl NativeAgent {
    /// The connection of this process: after a fork, a new one (the parent's is left
    /// alone, leaked).
    fn connection_here(&self) -> Arc<OnceCell<Agent>> {
        let mut connection = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if connection.get().is_none() {
            *connection = ProcessBound::new(Arc::default());
        }
        connection.get().cloned().unwrap_or_default()
    }
}

/// A positive number of seconds as a duration.
fn duration(seconds: f64) -> PyResult<Duration> {
    match Duration::try_from_secs_f64(seconds) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        _ => Err(Failure::invalid(format!(
            "a timeout must be a positive number of seconds, not {seconds}"
        ))
        .into()),
    }
}

/// Checks a request before anything else (the agent, the network): the port must be an
/// `int` (not a `bool`) from 1 to 65535, by the crate's own rule, `h2` needs TLS (the
/// crate says so too, but only once connected), and `proxy_protocol` is `"v1"`, `"v2"`
/// or `None`. Returns the port.
#[pyfunction]
#[pyo3(signature = (port, unencrypted=false, h2=false, proxy_protocol=None))]
pub(crate) fn check_forward(
    port: &Bound<'_, PyAny>,
    unencrypted: bool,
    h2: bool,
    proxy_protocol: Option<&str>,
) -> PyResult<u16> {
    let text = if port.is_instance_of::<PyInt>() && !port.is_instance_of::<PyBool>() {
        port.str()?.to_string()
    } else {
        port.repr()?.to_string()
    };
    let port = portferry::parse_port(&text).map_err(Failure::from)?;
    if h2 && unencrypted {
        return Err(Failure::from(Error::H2RequiresTls).into());
    }
    if let Some(version) = proxy_protocol.filter(|v| ProxyProtocol::parse(v).is_none()) {
        return Err(Failure::invalid(format!(
            "proxy_protocol must be \"v1\", \"v2\" or None, not {version:?}"
        ))
        .into());
    }
    Ok(port)
}
