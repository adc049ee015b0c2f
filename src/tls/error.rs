//! The error type of everything in [`tls`](crate::tls): each message names the file and
//! says what to do.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::state_dir::StateError;

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

#[cfg(feature = "relay")]
impl From<rcgen::Error> for TlsError {
    fn from(e: rcgen::Error) -> Self {
        TlsError::Generate {
            reason: e.to_string(),
        }
    }
}

impl From<StateError> for TlsError {
    fn from(e: StateError) -> Self {
        TlsError::Io {
            path: e.path,
            source: e.source,
        }
    }
}
