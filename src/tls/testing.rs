//! Helpers for the unit tests of the `tls` modules: a scratch directory and an in-memory
//! handshake.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The domain the tests issue certificates for.
pub(crate) const DOMAIN: &str = "portferry.localhost";

/// A fresh directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// A path that does not exist yet.
    pub(crate) fn new() -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("portferry-tls-test-{:016x}", rand::random::<u64>()));
        TempDir(dir)
    }

    /// The directory's path.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to the file `name` in the directory (created if needed).
    pub(crate) fn write(&self, name: &str, contents: &str) -> PathBuf {
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
pub(crate) async fn handshake(
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

/// The rustls error inside a handshake's I/O error.
pub(crate) fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A file's contents.
pub(crate) fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap()
}
