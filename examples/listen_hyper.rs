//! Serve HTTP through a tunnel without binding any local port.
//!
//! [`Agent::listen`] hands out connections straight from the agent's userspace TCP
//! stack; each one is an `AsyncRead + AsyncWrite` stream that hyper serves like a
//! socket, and knows its public client (`peer_addr`), which the service answers with
//! (as axum's `ConnectInfo` would hand it to a handler).
//!
//! Start a relay in one terminal; it prints the environment an agent needs:
//!
//! ```text
//! cargo run -- relay
//! ```
//!
//! then, with those three variables set, in another:
//!
//! ```text
//! PORTFERRY_RELAY=localhost:7835 PORTFERRY_TOKEN=... PORTFERRY_RELAY_CA=.../ca.pem \
//!     cargo run --example listen_hyper
//! curl --cacert .../ca.pem https://<printed host>:8443/
//! ```

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use portferry::{Agent, AgentConfig, ForwardOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // PORTFERRY_RELAY, PORTFERRY_TOKEN and (optionally) PORTFERRY_RELAY_CA.
    let agent = Agent::connect(AgentConfig::from_env()?).await?;
    // The tunnel lives as long as `listener`; dropping it closes the tunnel.
    let mut listener = agent.listen(ForwardOptions::default()).await?;
    println!("serving on {}", listener.tunnel().url());

    loop {
        // Fails only once the agent's link to the relay is gone for good.
        let stream = listener.accept().await?;
        let client = stream.peer_addr();
        tokio::spawn(async move {
            let service = service_fn(move |_request: Request<Incoming>| async move {
                let body = format!("hello {client}, from a tunnel with no local port\n");
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection ended with an error: {e}");
            }
        });
    }
}
