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

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// File name of the local CA certificate inside the state directory.
const CA_CERT_FILE: &str = "ca.pem";
/// File name of the local CA private key inside the state directory.
const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the local server (leaf) certificate inside the state directory.
const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the local server (leaf) private key inside the state directory.
const SERVER_KEY_FILE: &str = "server-key.pem";

/// Common name of the generated CA (also how the CA is recognised when it is reused).
const CA_COMMON_NAME: &str = "portferry local CA";
/// Organisation of the generated CA.
const CA_ORGANIZATION: &str = "portferry";

const DAY: u64 = 24 * 60 * 60;
/// How far `not_before` is set in the past, to tolerate clocks that are a little behind.
const BACKDATE: Duration = Duration::from_secs(DAY);
/// Lifetime of the generated CA.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * DAY);
/// Lifetime of the generated server certificate.
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * DAY);
/// A stored server certificate that expires within this margin is re-issued.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * DAY);
/// Label used to check that a stored certificate covers `*.<domain>`.
const PROBE_LABEL: &str = "portferry-probe";
/// Names the local server certificate also covers, so that a client on the same machine can
/// reach the relay's agent endpoint as `localhost:<port>` or `127.0.0.1:<port>`.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

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

/// Errors from loading, generating or using certificates.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    /// A file that must exist does not.
    MissingFile {
        /// What the file should hold ("certificate", "private key", "CA certificate").
        what: &'static str,
        /// The path that was tried.
        path: PathBuf,
    },
    /// Reading or writing a file or directory failed for another reason than its absence.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file is not well-formed PEM.
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file holds no PEM `CERTIFICATE` block.
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A file holds no PEM private key block.
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// A certificate cannot be parsed or used.
    InvalidCertificate {
        /// The file holding it.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A private key cannot be parsed or is of an unsupported type.
    InvalidKey {
        /// The file holding it.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The private key does not belong to the certificate.
    KeyMismatch {
        /// The certificate file.
        cert_path: PathBuf,
        /// The private key file.
        key_path: PathBuf,
    },
    /// No usable wildcard certificate can be issued for this domain.
    InvalidDomain {
        /// The domain that was asked for.
        domain: String,
        /// Why it cannot be used, and what to use instead.
        reason: String,
    },
    /// Generating a certificate or key failed.
    Generate {
        /// The generator's error.
        reason: String,
    },
    /// rustls refused the configuration (for instance a key type it does not support).
    Config(rustls::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::MissingFile { what, path } => write!(
                f,
                "{what} file {} does not exist: pass the path of an existing PEM file",
                path.display()
            ),
            TlsError::Io { path, source } => write!(
                f,
                "cannot access {}: {source}: check the path and its permissions",
                path.display()
            ),
            TlsError::Pem { path, reason } => write!(
                f,
                "{} is not valid PEM ({reason}): expected base64 blocks between \
                 '-----BEGIN ...-----' and '-----END ...-----' lines",
                path.display()
            ),
            TlsError::NoCertificate { path } => write!(
                f,
                "no certificate found in {}: expected a PEM 'CERTIFICATE' block",
                path.display()
            ),
            TlsError::NoPrivateKey { path } => write!(
                f,
                "no private key found in {}: expected an unencrypted PEM 'PRIVATE KEY', \
                 'RSA PRIVATE KEY' or 'EC PRIVATE KEY' block",
                path.display()
            ),
            TlsError::InvalidCertificate { path, reason } => write!(
                f,
                "the certificate in {} cannot be used ({reason}): expected an X.509 \
                 certificate in a PEM 'CERTIFICATE' block",
                path.display()
            ),
            TlsError::InvalidKey { path, reason } => write!(
                f,
                "the private key in {} cannot be used ({reason}): expected an unencrypted \
                 RSA, ECDSA (P-256 or P-384) or Ed25519 key",
                path.display()
            ),
            TlsError::KeyMismatch {
                cert_path,
                key_path,
            } => write!(
                f,
                "the private key in {} does not belong to the certificate in {}: \
                 pass the key the certificate was issued for",
                key_path.display(),
                cert_path.display()
            ),
            TlsError::InvalidDomain { domain, reason } => {
                write!(
                    f,
                    "cannot issue a wildcard certificate for {domain:?}: {reason}"
                )
            }
            TlsError::Generate { reason } => write!(
                f,
                "generating a local certificate failed ({reason}): this is a bug, please report it"
            ),
            TlsError::Config(e) => write!(f, "cannot build the TLS configuration: {e}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Io { source, .. } => Some(source),
            TlsError::Config(e) => Some(e),
            _ => None,
        }
    }
}

impl From<rcgen::Error> for TlsError {
    fn from(e: rcgen::Error) -> Self {
        TlsError::Generate {
            reason: e.to_string(),
        }
    }
}

/// Loads a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1),
/// and checks that the key belongs to the leaf.
pub fn load_identity(cert_path: &Path, key_path: &Path) -> Result<ServerIdentity, TlsError> {
    let cert_chain = read_certs(cert_path, "certificate")?;
    let key_pem = read_file(key_path, "private key")?;
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsError::NoPrivateKey {
                path: key_path.to_owned(),
            })
        }
        Err(e) => return Err(pem_error(key_path, e)),
    };
    let signing_key = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::InvalidKey {
            path: key_path.to_owned(),
            reason: e.to_string(),
        })?;
    match CertifiedKey::new(cert_chain.clone(), signing_key).keys_match() {
        // `Unknown`: the key type cannot report its public key, so there is nothing to compare.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsError::KeyMismatch {
                cert_path: cert_path.to_owned(),
                key_path: key_path.to_owned(),
            })
        }
        Err(e) => {
            return Err(TlsError::InvalidCertificate {
                path: cert_path.to_owned(),
                reason: e.to_string(),
            })
        }
    }
    Ok(ServerIdentity { cert_chain, key })
}

/// Loads a PEM CA bundle into a root store; fails if the file holds no certificate or an
/// unusable one.
pub fn load_ca_roots(ca_path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_path, "CA certificate")? {
        roots.add(cert).map_err(|e| TlsError::InvalidCertificate {
            path: ca_path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The system's trust roots: Mozilla's CA set compiled in (`webpki-roots`), so they work in
/// minimal containers that have no `/etc/ssl/certs`.
pub fn system_roots() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// Builds a TLS server configuration (ring provider, TLS 1.2 and 1.3, no client
/// authentication) that presents `identity` and offers the `alpn` protocols in order of
/// preference.
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

/// Returns a local CA and a server certificate for `domain`, `*.<domain>` and the loopback
/// names (`localhost`, `127.0.0.1`, `::1`), kept in `state_dir` and reused across restarts.
///
/// The directory is created (mode 0700 on unix) if needed and holds `ca.pem`, `ca-key.pem`,
/// `server.pem` and `server-key.pem` (keys mode 0600); files are replaced atomically.
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
    create_private_dir(state_dir)?;
    let ca_cert_path = state_dir.join(CA_CERT_FILE);
    let ca_key_path = state_dir.join(CA_KEY_FILE);
    let cert_path = state_dir.join(SERVER_CERT_FILE);
    let key_path = state_dir.join(SERVER_KEY_FILE);

    let (mut ca, ca_is_new) = match load_local_ca(&ca_cert_path, &ca_key_path)? {
        Some(ca) => (ca, false),
        None => (new_local_ca(&ca_cert_path, &ca_key_path)?, true),
    };
    if !ca_is_new {
        if let Some(identity) = load_local_leaf(&cert_path, &key_path)? {
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
        ca = new_local_ca(&ca_cert_path, &ca_key_path)?;
        leaf = issue_leaf(&ca, domain)?;
    }
    write_atomically(&key_path, leaf.key_pem.as_bytes(), true)?;
    write_atomically(&cert_path, leaf.cert_pem.as_bytes(), false)?;
    Ok(LocalPki {
        ca_cert_path,
        ca_cert: ca.cert,
        identity: leaf.identity,
    })
}

/// The crypto provider of every configuration built here.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Reads a whole file; absence is [`TlsError::MissingFile`].
fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => TlsError::MissingFile {
            what,
            path: path.to_owned(),
        },
        _ => TlsError::Io {
            path: path.to_owned(),
            source,
        },
    })
}

/// Reads a file if it exists.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, TlsError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TlsError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads every `CERTIFICATE` block of a PEM file; none is [`TlsError::NoCertificate`].
fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        reason: e.to_string(),
    }
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

/// Creates `dir` (and its parents) readable by this user only.
fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| TlsError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// Writes `contents` to a fresh temporary file beside `path` and renames it over `path`,
/// so that readers never see a half-written file; `secret` files get mode 0600 on unix.
fn write_atomically(path: &Path, contents: &[u8], secret: bool) -> Result<(), TlsError> {
    let io_error = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".{:016x}.tmp", rand::random::<u64>()));
    let tmp = path.with_file_name(tmp_name);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if secret { 0o600 } else { 0o644 });
    #[cfg(not(unix))]
    let _ = secret;
    let written = options.open(&tmp).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(io_error(e));
    }
    Ok(())
}

/// A CA that can issue certificates.
struct LocalCa {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// The parameters of the local CA, except its validity. Rebuilding them for a stored CA gives
/// the same issuer name and key identifier, so no certificate parser is needed to reuse it.
fn ca_params() -> CertificateParams {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    name.push(DnType::OrganizationName, CA_ORGANIZATION);
    let mut params = CertificateParams::default();
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Loads the stored CA; `None` if a file is missing or unparsable.
fn load_local_ca(cert_path: &Path, key_path: &Path) -> Result<Option<LocalCa>, TlsError> {
    let (Some(cert_pem), Some(key_pem)) = (read_optional(cert_path)?, read_optional(key_path)?)
    else {
        return Ok(None);
    };
    let (Ok(cert), Ok(key)) = (
        CertificateDer::from_pem_slice(&cert_pem),
        PrivateKeyDer::from_pem_slice(&key_pem),
    ) else {
        return Ok(None);
    };
    let Ok(key) = KeyPair::try_from(&key) else {
        return Ok(None);
    };
    Ok(Some(LocalCa {
        cert,
        issuer: Issuer::new(ca_params(), key),
    }))
}

/// Generates a new CA and stores it (key first, so a crash never leaves a CA without key).
fn new_local_ca(cert_path: &Path, key_path: &Path) -> Result<LocalCa, TlsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params();
    set_validity(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key)?;
    write_atomically(key_path, key.serialize_pem().as_bytes(), true)?;
    write_atomically(cert_path, cert.pem().as_bytes(), false)?;
    Ok(LocalCa {
        cert: cert.der().clone(),
        issuer: Issuer::new(params, key),
    })
}

/// Loads the stored server certificate; `None` if a file is missing or unparsable.
fn load_local_leaf(cert_path: &Path, key_path: &Path) -> Result<Option<ServerIdentity>, TlsError> {
    let (Some(cert_pem), Some(key_pem)) = (read_optional(cert_path)?, read_optional(key_path)?)
    else {
        return Ok(None);
    };
    let (Ok(cert_chain), Ok(key)) = (
        CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<Vec<_>, _>>(),
        PrivateKeyDer::from_pem_slice(&key_pem),
    ) else {
        return Ok(None);
    };
    Ok(Some(ServerIdentity { cert_chain, key }))
}

/// A freshly issued server certificate, with the PEM to store.
struct IssuedLeaf {
    identity: ServerIdentity,
    cert_pem: String,
    key_pem: String,
}

/// Issues a server certificate for `domain`, `*.<domain>` and [`LOOPBACK_NAMES`] signed by `ca`.
fn issue_leaf(ca: &LocalCa, domain: &str) -> Result<IssuedLeaf, TlsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut names = vec![domain.to_owned(), format!("*.{domain}")];
    names.extend(
        LOOPBACK_NAMES
            .iter()
            .filter(|n| **n != domain)
            .map(|n| n.to_string()),
    );
    // Strings that parse as IP addresses become IP address SANs.
    let mut params = CertificateParams::new(names)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, domain);
    params.distinguished_name = name;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_VALIDITY);
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok(IssuedLeaf {
        identity: ServerIdentity {
            cert_chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        },
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Sets `not_before` a day back and `not_after` `validity` from now.
fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(BACKDATE);
    params.not_after = epoch + now + validity;
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
    use super::*;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    /// A self-signed certificate for `sec1.test` with its key in SEC1 form
    /// (`openssl ecparam -genkey -noout`), valid until 2126.
    const SEC1_KEY: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIDPxEs1/9CxjrAwB2EXr5vjZR+36ikVas94gXFku/Q/coAoGCCqGSM49
AwEHoUQDQgAEmB5+WK+xg+USerZ8j3X6WkkIqN9UydTPoby/cLzFhOoYwm9yuLs8
ko1GvI5PO4pvaXk8fsJ8Js6QHBv6V2ZGSw==
-----END EC PRIVATE KEY-----
";
    const SEC1_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBlTCCATugAwIBAgIUF+xOJHgcZgvSINvbVFywzDBGIVcwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJc2VjMS50ZXN0MCAXDTI2MTEyNTA2NTUzMloYDzIxMjYxMTAx
MDY1NTMyWjAUMRIwEAYDVQQDDAlzZWMxLnRlc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAASYHn5Yr7GD5RJ6tnyPdfpaSQio31TJ1M+hvL9wvMWE6hjCb3K4uzyS
jUa8jk87im9peTx+wnwmzpAcG/pXZkZLo2kwZzAdBgNVHQ4EFgQUfaaRUQ1TpGC6
GmoI7bMHdVhIKHwwHwYDVR0jBBgwFoAUfaaRUQ1TpGC6GmoI7bMHdVhIKHwwDwYD
VR0TAQH/BAUwAwEB/zAUBgNVHREEDTALgglzZWMxLnRlc3QwCgYIKoZIzj0EAwID
SAAwRQIhAP/bDfy8JNw+piOOzV/Dw6yEaZ8Hfu+54rwbGY3pRa3OAiAoT3552xTV
6BCcKlBQy/7QxIKKg6RvkT0SiU6hcEt1Pg==
-----END CERTIFICATE-----
";

    const DOMAIN: &str = "portferry.localhost";

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("portferry-tls-test-{:016x}", rand::random::<u64>()));
            TempDir(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            fs::create_dir_all(&self.0).unwrap();
            let path = self.0.join(name);
            fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Runs a TLS handshake over an in-memory pipe; returns the ALPN protocol the client got.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        sni: &str,
    ) -> Result<Option<Vec<u8>>, io::Error> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from(sni.to_owned()).unwrap();
        let (server_result, client_result) = tokio::join!(
            TlsAcceptor::from(server).accept(server_io),
            TlsConnector::from(client).connect(name, client_io),
        );
        let client_stream = client_result?;
        server_result?;
        Ok(client_stream
            .get_ref()
            .1
            .alpn_protocol()
            .map(<[u8]>::to_vec))
    }

    fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
        e.get_ref()?.downcast_ref::<rustls::Error>()
    }

    fn read(path: &Path) -> Vec<u8> {
        fs::read(path).unwrap()
    }

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
            assert_eq!(mode(CA_KEY_FILE), 0o600);
            assert_eq!(mode(SERVER_KEY_FILE), 0o600);
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

    #[tokio::test]
    async fn wildcard_under_single_label_is_rejected_by_rustls() {
        // Why `local_pki` refuses "localhost": a `*.localhost` certificate does not
        // verify for `abc123.localhost` (webpki wants two labels after a wildcard).
        let dir = TempDir::new();
        create_private_dir(dir.path()).unwrap();
        let ca = new_local_ca(
            &dir.path().join(CA_CERT_FILE),
            &dir.path().join(CA_KEY_FILE),
        )
        .unwrap();
        let leaf = issue_leaf(&ca, "localhost").unwrap();
        let server = server_config(&leaf.identity, &[]).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert.clone()).unwrap();
        let client = client_config(roots, &[]);
        handshake(server.clone(), client.clone(), "localhost")
            .await
            .unwrap();
        let err = handshake(server, client, "abc123.localhost")
            .await
            .unwrap_err();
        assert!(matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(_))
        ));
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

    #[test]
    fn load_identity_reads_sec1_keys() {
        let dir = TempDir::new();
        let cert = dir.write("cert.pem", SEC1_CERT);
        let key = dir.write("key.pem", SEC1_KEY);
        let identity = load_identity(&cert, &key).unwrap();
        assert_eq!(identity.cert_chain.len(), 1);
        assert!(matches!(identity.key, PrivateKeyDer::Sec1(_)));
        server_config(&identity, &[]).unwrap();
        // A file holding both blocks works for both arguments.
        let both = dir.write("both.pem", &format!("{SEC1_KEY}{SEC1_CERT}"));
        load_identity(&both, &both).unwrap();
        let debug = format!("{identity:?}");
        assert!(debug.contains("redacted"), "{debug}");
    }

    #[test]
    fn load_identity_errors_name_the_file() {
        let dir = TempDir::new();
        let cert = dir.write("cert.pem", SEC1_CERT);
        let key = dir.write("key.pem", SEC1_KEY);
        let missing = dir.path().join("missing.pem");

        let err = load_identity(&missing, &key).unwrap_err();
        assert!(matches!(
            err,
            TlsError::MissingFile {
                what: "certificate",
                ..
            }
        ));
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let err = load_identity(&cert, &missing).unwrap_err();
        assert!(matches!(
            err,
            TlsError::MissingFile {
                what: "private key",
                ..
            }
        ));

        // A key file without a key (here: a certificate only).
        let err = load_identity(&cert, &cert).unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("no private key found in {}", cert.display())),
            "{err}"
        );
        // A certificate file without a certificate.
        let err = load_identity(&key, &key).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        // Broken PEM.
        let broken = dir.write("broken.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");
        let err = load_identity(&broken, &key).unwrap_err();
        assert!(matches!(err, TlsError::Pem { .. }), "{err}");
        // A key that does not belong to the certificate.
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let other_key = dir.write("other-key.pem", &other.serialize_pem());
        let err = load_identity(&cert, &other_key).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        // A key block that is not a key.
        let junk_key = dir.write(
            "junk-key.pem",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        let err = load_identity(&cert, &junk_key).unwrap_err();
        assert!(matches!(err, TlsError::InvalidKey { .. }), "{err}");
    }

    #[test]
    fn load_ca_roots_needs_a_certificate() {
        let dir = TempDir::new();
        let ca = dir.write("ca.pem", SEC1_CERT);
        assert_eq!(load_ca_roots(&ca).unwrap().len(), 1);
        let empty = dir.write("empty.pem", "");
        let err = load_ca_roots(&empty).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        let err = load_ca_roots(&dir.path().join("nope.pem")).unwrap_err();
        assert!(matches!(err, TlsError::MissingFile { .. }), "{err}");
        assert!(client_config_from(Some(&ca)).is_ok());
        assert!(client_config_from(Some(&empty)).is_err());
    }

    #[test]
    fn system_roots_are_compiled_in() {
        assert!(system_roots().len() > 50);
        assert!(client_config_from(None).is_ok());
    }
}
