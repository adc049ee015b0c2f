//! The local development PKI: a CA and a wildcard server certificate kept in the state
//! directory, reused while they are usable and replaced when they are not.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

use super::issue::{
    issue_leaf, load_local_ca, load_local_leaf, new_local_ca, CA_CERT_FILE, LOOPBACK_NAMES,
};
use super::{provider, ServerIdentity, TlsError};
use crate::state_dir::StateDir;

/// A stored server certificate that expires within this margin is re-issued.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Label used to check that a stored certificate covers `*.<domain>`.
const PROBE_LABEL: &str = "portferry-probe";

/// The local development PKI returned by [`local_pki`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LocalPki {
    /// Path of the CA certificate (PEM) that clients must trust, e.g. `curl --cacert`.
    pub ca_cert_path: PathBuf,
    /// The CA certificate itself (DER).
    pub ca_cert: CertificateDer<'static>,
    /// The server certificate (for `<domain>` and `*.<domain>`) and its key.
    pub identity: ServerIdentity,
}

impl LocalPki {
    /// A root store that trusts only the local CA, for clients in the same process.
    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates([self.ca_cert.clone()]);
        roots
    }
}

/// Returns a local CA and a server certificate for `domain`, `*.<domain>` and the loopback
/// names (`localhost`, `127.0.0.1`, `::1`), kept in `state_dir` and reused across restarts.
///
/// The directory is opened as a [`StateDir`] (created or tightened to mode 0700 on unix) and
/// holds `ca.pem`, `ca-key.pem`, `server.pem` and `server-key.pem` (mode 0600), each
/// replaced atomically and durably.
///
/// - The CA (ECDSA P-256, valid 10 years, may only sign leaves) is created once and reused
///   while its files are present and usable, so clients that trust `ca.pem` keep working.
/// - The server certificate (ECDSA P-256, valid 1 year) is reused while it chains to the CA,
///   covers all those names, matches its key and has more than 30 days left;
///   otherwise a new one is issued by the same CA (so changing `domain` keeps the CA).
/// - Stored files that cannot be parsed, or a CA whose key does not sign verifiable
///   certificates, are replaced rather than reported; read or write failures are errors.
///
/// `domain` needs at least two labels (`portferry.localhost`, not `localhost`), because
/// no client accepts a wildcard directly under a single label; see the module docs.
pub fn local_pki(state_dir: &Path, domain: &str) -> Result<LocalPki, TlsError> {
    check_wildcard_domain(domain)?;
    let dir = StateDir::open(state_dir)?;
    let ca_cert_path = dir.file(CA_CERT_FILE);

    let (mut ca, ca_is_new) = match load_local_ca(&dir)? {
        Some(ca) => (ca, false),
        None => (new_local_ca(&dir)?, true),
    };
    if !ca_is_new {
        if let Some(identity) = load_local_leaf(&dir)? {
            if leaf_is_current(&ca.cert, &identity, domain) {
                return Ok(LocalPki {
                    ca_cert_path,
                    ca_cert: ca.cert,
                    identity,
                });
            }
        }
    }
    let mut leaf = issue_leaf(&ca, domain)?;
    if !ca_is_new && !leaf_is_current(&ca.cert, &leaf.identity, domain) {
        // The stored CA cannot issue a certificate that verifies (its key does not match its
        // certificate, or it was made by something else): it is of no use to any client.
        ca = new_local_ca(&dir)?;
        leaf = issue_leaf(&ca, domain)?;
    }
    leaf.store(&dir)?;
    Ok(LocalPki {
        ca_cert_path,
        ca_cert: ca.cert,
        identity: leaf.identity,
    })
}

/// Checks that `domain` is a DNS name under which a wildcard certificate is accepted.
fn check_wildcard_domain(domain: &str) -> Result<(), TlsError> {
    let invalid = |reason: String| TlsError::InvalidDomain {
        domain: domain.to_owned(),
        reason,
    };
    match ServerName::try_from(domain) {
        Ok(ServerName::DnsName(_)) => {}
        Ok(_) => return Err(invalid("it is an IP address, not a DNS name".into())),
        Err(_) => return Err(invalid("it is not a valid DNS name".into())),
    }
    if domain.ends_with('.') {
        return Err(invalid("remove the trailing dot".into()));
    }
    if !domain.contains('.') {
        return Err(invalid(format!(
            "rustls, curl and browsers reject '*.{domain}' because a wildcard needs at least \
             two labels after it; use a domain with two labels such as 'portferry.{domain}'"
        )));
    }
    if ServerName::try_from(format!("{PROBE_LABEL}.{domain}")).is_err() {
        return Err(invalid("it leaves no room for a label under it".into()));
    }
    Ok(())
}

/// Whether `identity` chains to `ca`, covers `domain`, `*.<domain>` and [`LOOPBACK_NAMES`],
/// matches its key, and stays valid for [`RENEW_BEFORE`].
fn leaf_is_current(ca: &CertificateDer<'static>, identity: &ServerIdentity, domain: &str) -> bool {
    let Some((leaf, intermediates)) = identity.cert_chain.split_first() else {
        return false;
    };
    let mut roots = RootCertStore::empty();
    if roots.add(ca.clone()).is_err() {
        return false;
    }
    let Ok(verifier) =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build()
    else {
        return false;
    };
    let now = UnixTime::now();
    let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs()) + RENEW_BEFORE);
    let probe = format!("{PROBE_LABEL}.{domain}");
    for name in [domain, probe.as_str()].into_iter().chain(LOOPBACK_NAMES) {
        let Ok(name) = ServerName::try_from(name) else {
            return false;
        };
        for time in [now, later] {
            if verifier
                .verify_server_cert(leaf, intermediates, &name, &[], time)
                .is_err()
            {
                return false;
            }
        }
    }
    let Ok(signing_key) = provider()
        .key_provider
        .load_private_key(identity.key.clone_key())
    else {
        return false;
    };
    CertifiedKey::new(identity.cert_chain.clone(), signing_key)
        .keys_match()
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::super::issue::{CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE};
    use super::super::testing::{handshake, read, rustls_error, TempDir, DOMAIN};
    use super::super::{client_config, load_ca_roots, load_identity, server_config};
    use super::*;
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
    use std::fs;

    #[test]
    fn local_pki_generates_then_reuses() {
        let dir = TempDir::new();
        let first = local_pki(dir.path(), DOMAIN).unwrap();
        assert_eq!(first.ca_cert_path, dir.path().join(CA_CERT_FILE));
        for file in [CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE] {
            assert!(dir.path().join(file).is_file(), "{file} missing");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |name: &str| {
                let path = dir.path().join(name);
                fs::metadata(path).unwrap().permissions().mode() & 0o777
            };
            assert_eq!(mode(""), 0o700);
            for file in [CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE] {
                assert_eq!(mode(file), 0o600, "{file}");
            }
            // A state directory someone loosened is tightened on the next start.
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
            local_pki(dir.path(), DOMAIN).unwrap();
            assert_eq!(mode(""), 0o700);
        }
        let ca_pem = read(&dir.path().join(CA_CERT_FILE));
        let server_pem = read(&dir.path().join(SERVER_CERT_FILE));

        let second = local_pki(dir.path(), DOMAIN).unwrap();
        assert_eq!(read(&dir.path().join(CA_CERT_FILE)), ca_pem);
        assert_eq!(read(&dir.path().join(SERVER_CERT_FILE)), server_pem);
        assert_eq!(second.ca_cert, first.ca_cert);
        assert_eq!(second.identity.cert_chain, first.identity.cert_chain);
        assert_eq!(
            second.identity.key.secret_der(),
            first.identity.key.secret_der()
        );
        // What was stored loads through the production path too.
        let loaded = load_identity(
            &dir.path().join(SERVER_CERT_FILE),
            &dir.path().join(SERVER_KEY_FILE),
        )
        .unwrap();
        assert_eq!(loaded.cert_chain, first.identity.cert_chain);
        assert_eq!(load_ca_roots(&first.ca_cert_path).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn local_pki_other_domain_keeps_ca_and_reissues_leaf() {
        let dir = TempDir::new();
        let first = local_pki(dir.path(), DOMAIN).unwrap();
        let server_pem = read(&dir.path().join(SERVER_CERT_FILE));
        let second = local_pki(dir.path(), "other.localhost").unwrap();
        assert_eq!(second.ca_cert, first.ca_cert);
        assert_ne!(read(&dir.path().join(SERVER_CERT_FILE)), server_pem);

        // A client that trusted the CA before the change still accepts the new leaf.
        let server = server_config(&second.identity, &[b"http/1.1"]).unwrap();
        let client = client_config(first.roots(), &[]);
        handshake(server.clone(), client.clone(), "abc.other.localhost")
            .await
            .unwrap();
        let err = handshake(server, client, "abc.portferry.localhost")
            .await
            .unwrap_err();
        assert!(matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(_))
        ));
    }

    #[tokio::test]
    async fn handshake_under_domain_negotiates_h2() {
        let dir = TempDir::new();
        let pki = local_pki(dir.path(), DOMAIN).unwrap();
        let server = server_config(&pki.identity, &[b"h2", b"http/1.1"]).unwrap();
        let client = client_config(load_ca_roots(&pki.ca_cert_path).unwrap(), &[b"h2"]);
        for sni in ["abc123.portferry.localhost", "portferry.localhost"] {
            let alpn = handshake(server.clone(), client.clone(), sni)
                .await
                .unwrap();
            assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "{sni}");
        }
        // A client on the same machine (the agent link) can use the loopback names.
        for sni in ["localhost", "127.0.0.1", "::1"] {
            handshake(server.clone(), client.clone(), sni)
                .await
                .unwrap();
        }
        // Without h2 on the client, the server falls back to http/1.1.
        let client = client_config(pki.roots(), &[b"http/1.1"]);
        let alpn = handshake(server, client, "abc123.portferry.localhost")
            .await
            .unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    }

    #[tokio::test]
    async fn handshake_outside_domain_fails_with_certificate_error() {
        let dir = TempDir::new();
        let pki = local_pki(dir.path(), DOMAIN).unwrap();
        let server = server_config(&pki.identity, &[b"h2", b"http/1.1"]).unwrap();
        let client = client_config(pki.roots(), &[b"h2"]);
        for sni in ["abc123.otherdomain", "a.b.portferry.localhost"] {
            let err = handshake(server.clone(), client.clone(), sni)
                .await
                .unwrap_err();
            assert!(
                matches!(
                    rustls_error(&err),
                    Some(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::NotValidForName
                            | rustls::CertificateError::NotValidForNameContext { .. }
                    ))
                ),
                "{sni}: {err}"
            );
        }
    }

    #[test]
    fn local_pki_rejects_domains_without_usable_wildcard() {
        let dir = TempDir::new();
        for domain in [
            "localhost",
            "127.0.0.1",
            "bad domain",
            "",
            "portferry.localhost.",
        ] {
            let err = local_pki(dir.path(), domain).unwrap_err();
            assert!(matches!(err, TlsError::InvalidDomain { .. }), "{domain}");
        }
        let message = local_pki(dir.path(), "localhost").unwrap_err().to_string();
        assert!(message.contains("portferry.localhost"), "{message}");
        assert!(!dir.path().exists(), "nothing is written for a bad domain");
    }

    #[tokio::test]
    async fn local_pki_replaces_unusable_files() {
        let dir = TempDir::new();
        let first = local_pki(dir.path(), DOMAIN).unwrap();

        // A corrupt leaf is re-issued by the same CA.
        dir.write(SERVER_CERT_FILE, "garbage");
        let second = local_pki(dir.path(), DOMAIN).unwrap();
        assert_eq!(second.ca_cert, first.ca_cert);
        assert_ne!(second.identity.cert_chain, first.identity.cert_chain);

        // A leaf whose key was swapped is re-issued.
        let other_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        dir.write(SERVER_KEY_FILE, &other_key.serialize_pem());
        let third = local_pki(dir.path(), DOMAIN).unwrap();
        assert_eq!(third.ca_cert, first.ca_cert);
        assert_ne!(third.identity.cert_chain, second.identity.cert_chain);

        // A CA whose key does not match its certificate is useless: it is replaced.
        dir.write(CA_KEY_FILE, &other_key.serialize_pem());
        dir.write(SERVER_CERT_FILE, "garbage");
        let fourth = local_pki(dir.path(), DOMAIN).unwrap();
        assert_ne!(fourth.ca_cert, first.ca_cert);
        let server = server_config(&fourth.identity, &[]).unwrap();
        let client = client_config(load_ca_roots(&fourth.ca_cert_path).unwrap(), &[]);
        handshake(server, client, "x.portferry.localhost")
            .await
            .unwrap();
    }
}
