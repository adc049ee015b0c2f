//! The local CA: generating it, storing it in the state directory and reloading it, and the
//! server certificates it issues.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{ServerIdentity, TlsError};
use crate::state_dir::StateDir;

/// File name of the local CA certificate inside the state directory.
pub(super) const CA_CERT_FILE: &str = "ca.pem";
/// File name of the local CA private key inside the state directory.
pub(super) const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the local server (leaf) certificate inside the state directory.
pub(super) const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the local server (leaf) private key inside the state directory.
pub(super) const SERVER_KEY_FILE: &str = "server-key.pem";

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
/// Names the local server certificate also covers, so that a client on the same machine can
/// reach the relay's agent endpoint as `localhost:<port>` or `127.0.0.1:<port>`.
pub(super) const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A CA that can issue certificates.
pub(super) struct LocalCa {
    /// The CA certificate (DER), what clients trust.
    pub(super) cert: CertificateDer<'static>,
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
pub(super) fn load_local_ca(dir: &StateDir) -> Result<Option<LocalCa>, TlsError> {
    let (Some(cert_pem), Some(key_pem)) = (dir.read(CA_CERT_FILE)?, dir.read(CA_KEY_FILE)?) else {
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
pub(super) fn new_local_ca(dir: &StateDir) -> Result<LocalCa, TlsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params();
    set_validity(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key)?;
    dir.write(CA_KEY_FILE, key.serialize_pem().as_bytes())?;
    dir.write(CA_CERT_FILE, cert.pem().as_bytes())?;
    Ok(LocalCa {
        cert: cert.der().clone(),
        issuer: Issuer::new(params, key),
    })
}

/// Loads the stored server certificate; `None` if a file is missing or unparsable.
pub(super) fn load_local_leaf(dir: &StateDir) -> Result<Option<ServerIdentity>, TlsError> {
    let (Some(cert_pem), Some(key_pem)) = (dir.read(SERVER_CERT_FILE)?, dir.read(SERVER_KEY_FILE)?)
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
pub(super) struct IssuedLeaf {
    /// The certificate and its key, ready for a server configuration.
    pub(super) identity: ServerIdentity,
    cert_pem: String,
    key_pem: String,
}

impl IssuedLeaf {
    /// Stores the certificate and its key in `dir` (key first, like the CA).
    pub(super) fn store(&self, dir: &StateDir) -> Result<(), TlsError> {
        dir.write(SERVER_KEY_FILE, self.key_pem.as_bytes())?;
        dir.write(SERVER_CERT_FILE, self.cert_pem.as_bytes())?;
        Ok(())
    }
}

/// Issues a server certificate for `domain`, `*.<domain>` and [`LOOPBACK_NAMES`] signed by `ca`.
pub(super) fn issue_leaf(ca: &LocalCa, domain: &str) -> Result<IssuedLeaf, TlsError> {
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

#[cfg(test)]
mod tests {
    use super::super::testing::{handshake, rustls_error, TempDir};
    use super::super::{client_config, server_config};
    use super::*;
    use rustls::RootCertStore;

    #[tokio::test]
    async fn wildcard_under_single_label_is_rejected_by_rustls() {
        // Why `local_pki` refuses "localhost": a `*.localhost` certificate does not
        // verify for `abc123.localhost` (webpki wants two labels after a wildcard).
        let dir = TempDir::new();
        let ca = new_local_ca(&StateDir::open(dir.path()).unwrap()).unwrap();
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
}
