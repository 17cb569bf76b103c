//! TLS on the gRPC port: certificates from PEM files, reloaded when the files change (a renewed
//! Kubernetes Secret is swapped into the pod's volume), and optional client certificates.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context};
use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::TlsConfig;

/// How often the certificate files are checked for changes.
pub const CERT_REREAD: Duration = Duration::from_secs(5);
/// Time a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes that may be in progress at once; more wait in the kernel's accept queue.
const MAX_HANDSHAKES: usize = 256;

/// The rustls config in use, rebuilt when the files change.
pub struct Tls {
    files: TlsConfig,
    config: ArcSwap<ServerConfig>,
}

impl Tls {
    /// Reads the certificate, key and client CA; every error names its key.
    pub fn load(files: &TlsConfig) -> anyhow::Result<Arc<Tls>> {
        let config = server_config(files)?;
        Ok(Arc::new(Tls {
            files: files.clone(),
            config: ArcSwap::from_pointee(config),
        }))
    }

    /// Watches the files' modification times and swaps in a new config when they change. A
    /// broken new certificate is logged and the one in use stays.
    pub async fn watch(self: Arc<Self>) {
        let mut seen = self.stamps();
        let mut tick = tokio::time::interval(CERT_REREAD);
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = self.stamps();
            if now == seen {
                continue;
            }
            // Files of a Secret can change one after the other: a broken state is logged once,
            // and the next change is tried again.
            seen = now;
            match server_config(&self.files) {
                Ok(config) => {
                    self.config.store(Arc::new(config));
                    info!("TLS certificates reloaded");
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "cannot reload TLS certificates; keeping the ones in use");
                }
            }
        }
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        let mut paths = vec![&self.files.cert_file, &self.files.key_file];
        paths.extend(&self.files.client_ca_file);
        // A Secret volume swaps a `..data` symlink; metadata() follows it to the real file.
        paths
            .into_iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// Accepts TCP connections and yields those whose handshake succeeds. Handshakes run
    /// concurrently, each bounded in time, so a slow or silent client holds up no one else.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> impl futures_util::Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static
    {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let accepted = tokio::select! {
                    () = tx.closed() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(self.config.load_full());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

fn server_config(files: &TlsConfig) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&files.cert_file).context("tls.cert_file")?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| anyhow!("{}: {e}", files.key_file.display()))
        .context("tls.key_file")?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca_file {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca).context("tls.client_ca_file")? {
                roots
                    .add(cert)
                    .map_err(|e| anyhow!("{}: {e}", ca.display()))
                    .context("tls.client_ca_file")?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("tls.client_ca_file")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("tls.cert_file and tls.key_file do not form a usable pair")?;
    // gRPC runs over HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Every certificate in a PEM file; an empty file is an error.
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}
