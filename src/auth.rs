//! Client tokens: every RPC but health needs `authorization: Bearer TOKEN` when tokens are
//! configured. Tokens are read from files (one per file, mounted from Secrets) and re-read while
//! the service runs, so rotating a Secret needs no restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::Status;
use tracing::{debug, info, warn};

use crate::config::AuthConfig;
use crate::wire::{HEALTH_PREFIX, READ_ONLY_PATHS};

/// How often the token files are re-read. Kubernetes updates a mounted Secret within about a
/// minute; reading a few small files this often costs nothing.
pub const TOKEN_REREAD: Duration = Duration::from_secs(2);

/// How long a token file that cannot be read (but still exists) keeps its token.
pub const UNREADABLE_GRACE: Duration = Duration::from_secs(30);

/// Token files failing to be read, and since when.
type Failing = std::collections::HashMap<PathBuf, Instant>;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Every RPC.
    Full,
    /// `Get`, `Stat`, `RingStatus` and `Stats`.
    ReadOnly,
}

/// SHA-256 digests of the accepted tokens, each with the file it came from. Comparing
/// fixed-size digests, every one of them, without stopping at the first match, keeps the
/// comparison's time independent of the token.
#[derive(Default, PartialEq)]
struct TokenSet {
    tokens: Vec<(PathBuf, [u8; 32], Permission)>,
}

impl TokenSet {
    fn check(&self, presented: &[u8]) -> Option<Permission> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for (_, token, access) in &self.tokens {
            let diff = token
                .iter()
                .zip(&digest)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if std::hint::black_box(diff) == 0 && found != Some(Permission::Full) {
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

    /// Re-reads the files every [`TOKEN_REREAD`] (see [`Auth::reread`]).
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TOKEN_REREAD);
        tick.tick().await;
        let mut failing = Failing::new();
        loop {
            tick.tick().await;
            self.reread(&mut failing, Instant::now());
        }
    }

    /// Reads every token file again. A file that no longer exists revokes its token. A file
    /// that cannot be read for another reason, or holds no valid token (a rewrite half done, a
    /// permission being fixed), keeps that file's token for up to [`UNREADABLE_GRACE`], logged
    /// once; a file still failing after that revokes its token too. `failing` remembers, per
    /// file, since when it fails.
    fn reread(&self, failing: &mut Failing, now: Instant) {
        let current = self.tokens.load();
        let mut next = TokenSet::default();
        let mut still = Failing::new();
        for (key, i, path, access) in token_files(&self.config) {
            match read_token(path) {
                Ok(token) => next.push(path, &token, access),
                Err(TokenError::Missing(e)) => {
                    if current.holds(path) {
                        info!(file = %path.display(), "token file removed; its token is revoked");
                    }
                    debug!(key, i, error = %e, "token file missing");
                }
                Err(TokenError::Unreadable(e)) => {
                    let since = failing.get(path).copied();
                    let since = since.unwrap_or_else(|| {
                        warn!(key, i, error = %e, grace = ?UNREADABLE_GRACE, "cannot re-read a token file; keeping its token for the grace period");
                        now
                    });
                    still.insert(path.to_owned(), since);
                    if now.duration_since(since) < UNREADABLE_GRACE {
                        next.tokens
                            .extend(current.tokens.iter().filter(|(p, ..)| p == path).cloned());
                    } else if current.holds(path) {
                        warn!(key, i, error = %e, "token file still unreadable; its token is revoked");
                    }
                }
            }
        }
        *failing = still;
        if **current != next {
            info!(tokens = next.tokens.len(), "client tokens reloaded");
            self.tokens.store(Arc::new(next));
        }
    }

    /// Decides a request from its path and `authorization` header; returns the token's access
    /// (`None` for a public path).
    pub fn authorize(
        &self,
        path: &str,
        authorization: Option<&[u8]>,
    ) -> Result<Option<Permission>, Status> {
        if path.starts_with(HEALTH_PREFIX) {
            return Ok(None);
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
            Some(Permission::Full) => Ok(Some(Permission::Full)),
            Some(Permission::ReadOnly) if READ_ONLY_PATHS.contains(&path) => {
                Ok(Some(Permission::ReadOnly))
            }
            Some(Permission::ReadOnly) => Err(Status::permission_denied(format!(
                "authorization: a read-only token may not call {path}"
            ))),
            None => Err(Status::unauthenticated(
                "authorization: the token is not valid",
            )),
        }
    }
}

impl TokenSet {
    /// Whether a token from `path` is in the set.
    fn holds(&self, path: &Path) -> bool {
        self.tokens.iter().any(|(p, ..)| p == path)
    }

    fn push(&mut self, path: &Path, token: &str, access: Permission) {
        self.tokens.push((
            path.to_owned(),
            Sha256::digest(token.as_bytes()).into(),
            access,
        ));
    }
}

/// Every configured token file: its config key, index, path and the access it grants.
fn token_files(
    config: &AuthConfig,
) -> impl Iterator<Item = (&'static str, usize, &Path, Permission)> {
    let full = config
        .token_files
        .iter()
        .enumerate()
        .map(|(i, p)| ("auth.token_files", i, p.as_path(), Permission::Full));
    let read_only = config
        .read_only_token_files
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                "auth.read_only_token_files",
                i,
                p.as_path(),
                Permission::ReadOnly,
            )
        });
    full.chain(read_only)
}

/// At start every file must hold a valid token.
fn read_tokens(config: &AuthConfig) -> anyhow::Result<TokenSet> {
    let mut set = TokenSet::default();
    for (key, i, path, access) in token_files(config) {
        let token = read_token(path).map_err(|e| anyhow::anyhow!("{key}[{i}]: {e}"))?;
        set.push(path, &token, access);
    }
    Ok(set)
}

/// Why a token file gave no token.
#[derive(Debug, thiserror::Error)]
enum TokenError {
    /// The file is gone: its token is revoked.
    #[error("{0}")]
    Missing(String),
    /// Anything else, perhaps passing (a rewrite under way, a permission being fixed).
    #[error("{0}")]
    Unreadable(String),
}

fn read_token(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let message = format!("cannot read {}: {e}", path.display());
        if e.kind() == std::io::ErrorKind::NotFound {
            TokenError::Missing(message)
        } else {
            TokenError::Unreadable(message)
        }
    })?;
    let token = text.trim();
    if token.len() < 16 {
        return Err(TokenError::Unreadable(format!(
            "{}: a token must have at least 16 characters",
            path.display()
        )));
    }
    if token.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(TokenError::Unreadable(format!(
            "{}: a token must be printable ASCII without spaces",
            path.display()
        )));
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

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if !self.auth.enabled() {
            return futures_util::future::Either::Left(self.inner.call(request));
        }
        let header = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match self.auth.authorize(request.uri().path(), header) {
            Ok(access) => {
                // The handlers see what the caller may do: a read-only caller is never handed
                // a fill lease it could not fulfil.
                if let Some(access) = access {
                    request.extensions_mut().insert(access);
                }
                futures_util::future::Either::Left(self.inner.call(request))
            }
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
        let get = "/mediacache.v1.MediaCacheService/Get";
        let put = "/mediacache.v1.MediaCacheService/Put";
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
    fn a_removed_file_revokes_its_token_and_an_unreadable_one_keeps_it() {
        let (dir, auth) = auth(
            &["full-token-aaaaaaaaaaaa", "full-token-bbbbbbbbbbbb"],
            &["read-token-cccccccccccc"],
        );
        let get = "/mediacache.v1.MediaCacheService/Get";
        let ok = |t: &str| {
            auth.authorize(get, Some(format!("Bearer {t}").as_bytes()))
                .is_ok()
        };
        // full0 goes away; ro0 turns into something unreadable (a directory); full1 is rewritten.
        std::fs::remove_file(dir.path().join("full0")).unwrap();
        std::fs::remove_file(dir.path().join("ro0")).unwrap();
        std::fs::create_dir(dir.path().join("ro0")).unwrap();
        write_token_file(dir.path(), "full1", "full-token-dddddddddddd").unwrap();
        let mut failing = Failing::new();
        let start = Instant::now();
        auth.reread(&mut failing, start);
        assert!(
            !ok("full-token-aaaaaaaaaaaa"),
            "a deleted file revokes its token"
        );
        assert!(
            ok("read-token-cccccccccccc"),
            "an unreadable file keeps its token"
        );
        assert!(!ok("full-token-bbbbbbbbbbbb") && ok("full-token-dddddddddddd"));
        assert_eq!(failing.len(), 1, "{failing:?}");
        assert!(failing.contains_key(&dir.path().join("ro0")), "{failing:?}");
        auth.reread(&mut failing, start + UNREADABLE_GRACE / 2);
        assert!(
            ok("read-token-cccccccccccc"),
            "kept within the grace period"
        );
        // Once the file is back, it is read again, and the failure is over.
        std::fs::remove_dir(dir.path().join("ro0")).unwrap();
        write_token_file(dir.path(), "ro0", "read-token-eeeeeeeeeeee").unwrap();
        auth.reread(&mut failing, start + UNREADABLE_GRACE / 2);
        assert!(failing.is_empty());
        assert!(!ok("read-token-cccccccccccc") && ok("read-token-eeeeeeeeeeee"));
        // A file left empty (or otherwise invalid) past the grace period revokes its token.
        write_token_file(dir.path(), "ro0", "").unwrap();
        let later = start + UNREADABLE_GRACE;
        auth.reread(&mut failing, later);
        assert!(ok("read-token-eeeeeeeeeeee"), "kept at first");
        auth.reread(&mut failing, later + UNREADABLE_GRACE);
        assert!(
            !ok("read-token-eeeeeeeeeeee"),
            "revoked after the grace period"
        );
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
