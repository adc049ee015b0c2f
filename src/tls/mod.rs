//! Certificates and rustls configurations for the public TLS edge and the agent link.
//!
//! ```text
//!  production:  cert.pem + key.pem ──load_identity──► ServerIdentity ──server_config──► relay edge / agent endpoint
//!               ca-bundle.pem ─────load_ca_roots──► RootCertStore ──client_config──► agent (PORTFERRY_RELAY_CA)
//!  local use:   state dir ──local_pki──► ca.pem (give it to clients) + ServerIdentity for `<domain>`, `*.<domain>`
//! ```
//!
//! Every configuration uses the `ring` crypto provider explicitly, so nothing depends on a
//! process-wide default provider being installed.
//!
//! A wildcard covers exactly one label and needs at least two labels after it: rustls
//! (webpki), curl/OpenSSL and browsers all reject `*.localhost` for `abc.localhost`.
//! [`local_pki`] therefore refuses single-label domains; use e.g. `portferry.localhost`,
//! whose subdomains curl and most resolvers send to 127.0.0.1 like `localhost` itself.
//! Sharded hostnames (`<label>.<node>.<domain>`) need a certificate for `<node>.<domain>`.
//!
//! Modules: `pem` loads what an operator gives, `local` keeps the local PKI in the state
//! directory using `issue` to make certificates, `error` holds [`TlsError`].

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

mod error;
#[cfg(feature = "relay")]
mod issue;
#[cfg(feature = "relay")]
mod local;
mod pem;
#[cfg(test)]
mod testing;

pub use error::TlsError;
#[cfg(feature = "relay")]
pub use local::{local_pki, LocalPki};
pub use pem::{load_ca_roots, load_identity};

/// A certificate chain and its private key: what a TLS server presents.
pub struct ServerIdentity {
    /// The certificate chain, leaf first (DER).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (DER; PKCS#8, PKCS#1 or SEC1).
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ServerIdentity {
    fn clone(&self) -> Self {
        ServerIdentity {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The private key is a secret: never print it.
        f.debug_struct("ServerIdentity")
            .field("cert_chain_len", &self.cert_chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The system's trust roots: Mozilla's CA set compiled in (`webpki-roots`), so they work in
/// minimal containers that have no `/etc/ssl/certs`.
pub fn system_roots() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// Builds a TLS server configuration (ring provider, TLS 1.2 and 1.3, AES-128-GCM
/// preferred whatever the client's order, no client authentication) that presents
/// `identity` and offers the `alpn` protocols in order of preference.
pub fn server_config(
    identity: &ServerIdentity,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(TlsError::Config)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // The relay's CPU is the shared resource: our cipher order (AES-128-GCM first), not
    // the client's (often AES-256-GCM first).
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// Builds a TLS client configuration (ring provider, TLS 1.2 and 1.3, no client certificate)
/// that trusts `roots` and offers the `alpn` protocols in order of preference.
pub fn client_config(roots: RootCertStore, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        // Cannot fail: ring's default provider has cipher suites for both default versions.
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Builds a TLS client configuration (no ALPN) that trusts the PEM CA bundle at `ca_path`, or
/// the [`system_roots`] when there is none.
pub fn client_config_from(ca_path: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca_path {
        Some(path) => load_ca_roots(path)?,
        None => system_roots(),
    };
    Ok(client_config(roots, &[]))
}

/// The crypto provider of every configuration built here.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::ring::default_provider();
            // AES-128-GCM first: with ring it costs half of AES-256-GCM's CPU per byte on
            // this machine (0.49 against 0.93 s/GiB to encrypt and decrypt, issue 9), and
            // the agent link and every HTTPS connection pay it at the relay.
            provider.cipher_suites.sort_by_key(|suite| {
                !matches!(
                    suite.suite(),
                    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                        | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                        | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
                )
            });
            Arc::new(provider)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_roots_are_compiled_in() {
        assert!(system_roots().len() > 50);
        assert!(client_config_from(None).is_ok());
    }

    /// A client that lists AES-256-GCM first (rustls' own default order, like curl's
    /// and OpenSSL's) still gets AES-128-GCM.
    #[cfg(feature = "relay")]
    #[test]
    fn the_server_chooses_aes_128_gcm_over_the_clients_order() {
        let dir = testing::TempDir::new();
        let pki = local_pki(dir.path(), "portferry.localhost").unwrap();
        let server = server_config(&pki.identity, &[]).unwrap();
        let default_order = rustls::crypto::ring::default_provider();
        assert_eq!(
            default_order.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        let client = ClientConfig::builder_with_provider(Arc::new(default_order))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(pki.roots())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("a.portferry.localhost").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut server = rustls::ServerConnection::new(server).unwrap();
        // A TLS 1.3 handshake takes two flights each way; a few more rounds are slack.
        for _ in 0..8 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            server.read_tls(&mut &wire[..]).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            client.read_tls(&mut &wire[..]).unwrap();
            client.process_new_packets().unwrap();
        }
        assert_eq!(
            client.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }
}
