//! Client tokens: every RPC but health needs `authorization: Bearer TOKEN` when tokens are
//! configured. Tokens are read from files (one per file, mounted from Secrets) and re-read while
//! the service runs, so rotating a Secret needs no restart.

use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::Status;
use tracing::{info, warn};

use crate::config::AuthConfig;

/// How often the token files are re-read. Kubernetes updates a mounted Secret within about a
/// minute; reading a few small files this often costs nothing.
pub const REREAD: Duration = Duration::from_secs(2);

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every RPC.
    Full,
    /// `Get`, `Stat`, `RingStatus` and `Stats`.
    ReadOnly,
}

/// RPCs a read-only token may call.
const READ_ONLY_METHODS: &[&str] = &[
    "/mediacache.v1.MediaCache/Get",
    "/mediacache.v1.MediaCache/Stat",
    "/mediacache.v1.CacheAdmin/RingStatus",
    "/mediacache.v1.CacheAdmin/Stats",
];

/// Paths open to everyone: health checks come from probes and load balancers.
const PUBLIC_PREFIX: &str = "/grpc.health.v1.Health/";

/// SHA-256 digests of the accepted tokens. Comparing fixed-size digests, every one of them,
/// without stopping at the first match, keeps the comparison's time independent of the token.
#[derive(Default)]
struct TokenSet {
    tokens: Vec<([u8; 32], Access)>,
}

impl TokenSet {
    fn check(&self, presented: &[u8]) -> Option<Access> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for (token, access) in &self.tokens {
            let diff = token
                .iter()
                .zip(&digest)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if std::hint::black_box(diff) == 0 && found != Some(Access::Full) {
                found = Some(*access);
            }
        }
        found
    }
}

/// The configured token files and the tokens last read from them.
pub struct Auth {
    config: AuthConfig,
    tokens: ArcSwap<TokenSet>,
}

impl Auth {
    /// Reads every token file; an unreadable or empty file is an error naming its key.
    pub fn load(config: &AuthConfig) -> anyhow::Result<Arc<Auth>> {
        let tokens = read_tokens(config)?;
        Ok(Arc::new(Auth {
            config: config.clone(),
            tokens: ArcSwap::from_pointee(tokens),
        }))
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled()
    }

    /// Re-reads the files every [`REREAD`]; a file that cannot be read keeps the tokens in use.
    pub async fn watch(self: Arc<Self>) {
        let mut last_error = None;
        let mut tick = tokio::time::interval(REREAD);
        tick.tick().await;
        loop {
            tick.tick().await;
            match read_tokens(&self.config) {
                Ok(next) => {
                    last_error = None;
                    let current = self.tokens.load();
                    if current.tokens != next.tokens {
                        info!(tokens = next.tokens.len(), "client tokens reloaded");
                        self.tokens.store(Arc::new(next));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    if last_error.as_ref() != Some(&message) {
                        warn!(error = %message, "cannot re-read client tokens; keeping the ones in use");
                    }
                    last_error = Some(message);
                }
            }
        }
    }

    /// Decides a request from its path and `authorization` header.
    pub fn authorize(&self, path: &str, authorization: Option<&[u8]>) -> Result<(), Status> {
        if path.starts_with(PUBLIC_PREFIX) {
            return Ok(());
        }
        let Some(header) = authorization else {
            return Err(Status::unauthenticated(
                "authorization: missing; send \"authorization: Bearer TOKEN\"",
            ));
        };
        let token = header
            .strip_prefix(b"Bearer ")
            .or_else(|| header.strip_prefix(b"bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization: expected \"Bearer TOKEN\""))?;
        match self.tokens.load().check(token.trim_ascii()) {
            Some(Access::Full) => Ok(()),
            Some(Access::ReadOnly) if READ_ONLY_METHODS.contains(&path) => Ok(()),
            Some(Access::ReadOnly) => Err(Status::permission_denied(format!(
                "authorization: a read-only token may not call {path}"
            ))),
            None => Err(Status::unauthenticated(
                "authorization: the token is not valid",
            )),
        }
    }
}

fn read_tokens(config: &AuthConfig) -> anyhow::Result<TokenSet> {
    let mut set = TokenSet::default();
    let files = [
        ("auth.token_files", &config.token_files, Access::Full),
        (
            "auth.read_only_token_files",
            &config.read_only_token_files,
            Access::ReadOnly,
        ),
    ];
    for (key, paths, access) in files {
        for (i, path) in paths.iter().enumerate() {
            let token = read_token(path).map_err(|e| anyhow::anyhow!("{key}[{i}]: {e}"))?;
            set.tokens
                .push((Sha256::digest(token.as_bytes()).into(), access));
        }
    }
    Ok(set)
}

fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = text.trim();
    if token.len() < 16 {
        return Err(format!(
            "{}: a token must have at least 16 characters",
            path.display()
        ));
    }
    if token.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(format!(
            "{}: a token must be printable ASCII without spaces",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

/// The tower layer that checks every request before it reaches a gRPC service.
#[derive(Clone)]
pub struct AuthLayer(pub Arc<Auth>);

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Authorized<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorized {
            auth: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Authorized<S> {
    auth: Arc<Auth>,
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for Authorized<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        S::Future,
        std::future::Ready<Result<http::Response<Body>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !self.auth.enabled() {
            return futures_util::future::Either::Left(self.inner.call(request));
        }
        let header = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match self.auth.authorize(request.uri().path(), header) {
            Ok(()) => futures_util::future::Either::Left(self.inner.call(request)),
            Err(status) => {
                // The token itself is never logged.
                warn!(path = request.uri().path(), code = ?status.code(), reason = status.message(), "request refused");
                futures_util::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn write_token_file(dir: &Path, name: &str, token: &str) -> std::io::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, format!("{token}\n"))?;
        Ok(path)
    }

    fn auth(full: &[&str], read_only: &[&str]) -> (tempfile::TempDir, Arc<Auth>) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = AuthConfig::default();
        for (i, t) in full.iter().enumerate() {
            config
                .token_files
                .push(write_token_file(dir.path(), &format!("full{i}"), t).unwrap());
        }
        for (i, t) in read_only.iter().enumerate() {
            config
                .read_only_token_files
                .push(write_token_file(dir.path(), &format!("ro{i}"), t).unwrap());
        }
        let auth = Auth::load(&config).unwrap();
        (dir, auth)
    }

    #[test]
    fn tokens_decide_by_kind_and_method() {
        let (_dir, auth) = auth(
            &["full-token-aaaaaaaaaaaa", "full-token-bbbbbbbbbbbb"],
            &["read-token-cccccccccccc"],
        );
        let get = "/mediacache.v1.MediaCache/Get";
        let put = "/mediacache.v1.MediaCache/Put";
        let bearer = |t: &str| format!("Bearer {t}").into_bytes();
        assert!(auth
            .authorize(get, Some(&bearer("full-token-aaaaaaaaaaaa")))
            .is_ok());
        assert!(auth
            .authorize(put, Some(&bearer("full-token-bbbbbbbbbbbb")))
            .is_ok());
        assert!(auth
            .authorize(get, Some(&bearer("read-token-cccccccccccc")))
            .is_ok());
        let denied = auth
            .authorize(put, Some(&bearer("read-token-cccccccccccc")))
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        for header in [
            None,
            Some(&b"Bearer nope-nope-nope-nope"[..]),
            Some(b"Basic x"),
        ] {
            let err = auth.authorize(get, header).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{header:?}");
            assert!(err.message().starts_with("authorization:"));
        }
        assert!(auth.authorize("/grpc.health.v1.Health/Check", None).is_ok());
    }

    #[test]
    fn bad_token_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let short = write_token_file(dir.path(), "short", "abc").unwrap();
        let config = AuthConfig {
            token_files: vec![dir.path().join("missing")],
            read_only_token_files: vec![],
        };
        let err = Auth::load(&config).err().unwrap().to_string();
        assert!(err.starts_with("auth.token_files[0]: cannot read"), "{err}");
        let config = AuthConfig {
            token_files: vec![],
            read_only_token_files: vec![short],
        };
        let err = Auth::load(&config).err().unwrap().to_string();
        assert!(err.contains("auth.read_only_token_files[0]"), "{err}");
        assert!(err.contains("at least 16"), "{err}");
    }
}
