//! The PEM files an operator gives: a certificate chain with its key, and CA bundles.

use std::fs;
use std::io;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

use super::{provider, ServerIdentity, TlsError};

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

#[cfg(test)]
mod tests {
    use super::super::testing::TempDir;
    use super::super::{client_config_from, server_config};
    use super::*;
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};

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
}
