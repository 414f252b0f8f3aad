//! TLS for the servers licensor runs (the admission webhook, `licensor
//! serve --tls-cert/--tls-key`): a certificate and key read from files and
//! read again when they change (cert-manager renews them in place), and a
//! listener that completes each handshake in its own task.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A certificate chain and its key, from PEM files, read again when either
/// file changes.
#[derive(Debug)]
pub struct CertificateFiles {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<(Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl CertificateFiles {
    /// Reads both files; the message names the file that is wrong.
    pub fn load(cert: &Path, key: &Path) -> Result<CertificateFiles, String> {
        let (modified, pair) = read(cert, key)?;
        Ok(CertificateFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: Mutex::new((modified, pair)),
        })
    }

    /// The pair to present now: the files' if they changed and read well.
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().ok()?;
        let now = modified(&self.cert, &self.key);
        if now.is_some() && now != current.0 {
            match read(&self.cert, &self.key) {
                Ok(fresh) => {
                    tracing::info!(cert = %self.cert.display(), "certificate reloaded");
                    *current = fresh;
                }
                // Half-written files: keep serving the old pair and try again
                // on the next handshake.
                Err(e) => {
                    tracing::warn!(cert = %self.cert.display(), "certificate not reloaded: {e}")
                }
            }
        }
        Some(current.1.clone())
    }
}

impl ResolvesServerCert for CertificateFiles {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

fn modified(cert: &Path, key: &Path) -> Option<SystemTime> {
    let c = std::fs::metadata(cert).and_then(|m| m.modified());
    let k = std::fs::metadata(key).and_then(|m| m.modified());
    Some(c.ok()?.max(k.ok()?))
}

fn read(cert: &Path, key: &Path) -> Result<(Option<SystemTime>, Arc<CertifiedKey>), String> {
    let name = |p: &Path| {
        p.file_name().map_or_else(
            || p.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    };
    let modified = modified(cert, key);
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", name(cert)))?;
    if chain.is_empty() {
        return Err(format!("{} holds no certificate", name(cert)));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", name(key)))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| format!("{}: {e}", name(key)))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "{} and {} do not belong together: {e}",
            name(cert),
            name(key)
        )
    })?;
    Ok((modified, Arc::new(certified)))
}

/// A server configuration presenting `files` (TLS 1.2 and 1.3, ring).
pub fn server_config(files: CertificateFiles) -> Result<rustls::ServerConfig, rustls::Error> {
    Ok(rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(files)))
}

/// Accepts TCP connections and completes each TLS handshake in its own task,
/// so a slow client cannot hold up the others.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsListener {
    pub fn start(tcp: TcpListener, config: rustls::ServerConfig) -> TlsListener {
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let local = tcp
            .local_addr()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("TLS accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Answers go out as soon as they are written.
                let _ = stream.set_nodelay(true);
                let (acceptor, ready) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = ready.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        TlsListener { local, ready }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accepting task only ends with the listener; wait forever,
            // graceful shutdown ends the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        std::fs::write(dir.join("tls.crt"), cert.pem()).expect("tls.crt");
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("tls.key");
        cert.der().to_vec()
    }

    #[test]
    fn a_renewed_pair_is_presented_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().expect("dir");
        let first = write_pair(dir.path());
        let files =
            CertificateFiles::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key"))
                .expect("load");
        assert_eq!(files.current().expect("a pair").cert[0].as_ref(), first);

        std::thread::sleep(Duration::from_millis(20));
        let second = write_pair(dir.path());
        assert_eq!(files.current().expect("a pair").cert[0].as_ref(), second);

        // A key that does not belong to the certificate: keep the last pair.
        std::thread::sleep(Duration::from_millis(20));
        let key = rcgen::KeyPair::generate().expect("key");
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).expect("tls.key");
        assert_eq!(files.current().expect("a pair").cert[0].as_ref(), second);

        let empty = tempfile::tempdir().expect("dir");
        let e =
            CertificateFiles::load(&empty.path().join("tls.crt"), &empty.path().join("tls.key"))
                .expect_err("no files");
        assert!(e.to_string().contains("tls.crt"), "{e}");
    }
}
