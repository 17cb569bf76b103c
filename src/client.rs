//! A small typed client over the generated gRPC stubs, for Rust users and the CLI.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use mediacache::client::{media_key, Client};
//! let mut client = Client::connect("http://127.0.0.1:50051").await?;
//! let key = media_key("example.org", "AbCd", "");
//! client.put_bytes(key.clone(), Default::default(), "hello".into()).await?;
//! if let Some((info, body)) = client.get_bytes(key).await? {
//!     assert_eq!(info.size, body.len() as u64);
//! }
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status, Streaming};

use crate::proto::{
    cache_admin_service_client::CacheAdminServiceClient, get_response,
    media_cache_service_client::MediaCacheServiceClient, put_request, GetRequest, GetResponse,
    MediaInfo, MediaKey, PurgeOriginRequest, PurgeOriginResponse, PurgeRequest, PurgeResponse,
    PutHeader, PutRequest, PutResponse, RingStatusRequest, RingStatusResponse, StatRequest,
    StatResponse, StatsRequest, StatsResponse,
};
use crate::wire;

/// Chunk size the client sends on Put.
pub const PUT_CHUNK_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("{0}")]
    Options(String),
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(#[from] Status),
    #[error("server broke the protocol: {0}")]
    Protocol(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub fn media_key(origin: &str, media_id: &str, variant: &str) -> MediaKey {
    MediaKey {
        origin: origin.to_owned(),
        media_id: media_id.to_owned(),
        variant: variant.to_owned(),
    }
}

/// How to reach a server that wants a token or speaks TLS.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Sent as `authorization: Bearer TOKEN` with every request.
    pub token: Option<String>,
    /// PEM CA certificates to verify the server with; needed for an `https://` address (this
    /// build carries no system roots).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate chain and key to present, for servers that want client certificates.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Name to verify the server's certificate against, when it differs from the address' host.
    pub domain: Option<String>,
}

/// Adds the bearer token, if any, to every request.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

#[derive(Clone)]
pub struct Client {
    cache: MediaCacheServiceClient<Authed>,
    admin: CacheAdminServiceClient<Authed>,
}

/// What [`Client::get_or_lease`] found.
pub enum Fetched {
    Hit(Box<Download>),
    /// A miss; with a non-empty token this caller holds the fill lease.
    Miss {
        lease_token: String,
    },
}

/// An open hit: the object's info, then the body chunks of the requested range.
pub struct Download {
    pub info: MediaInfo,
    stream: Streaming<GetResponse>,
}

impl Download {
    /// The next body chunk; `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        match self.stream.message().await? {
            None => Ok(None),
            Some(GetResponse {
                kind: Some(get_response::Kind::Chunk(b)),
            }) => Ok(Some(b)),
            Some(_) => Err(ClientError::Protocol("expected a chunk")),
        }
    }

    /// Copies the rest of the body to `out`; returns the bytes written.
    pub async fn write_to<W: AsyncWrite + Unpin>(
        &mut self,
        out: &mut W,
    ) -> Result<u64, ClientError> {
        let mut n = 0;
        while let Some(chunk) = self.next_chunk().await? {
            out.write_all(&chunk).await?;
            n += chunk.len() as u64;
        }
        out.flush().await?;
        Ok(n)
    }
}

impl Client {
    pub async fn connect(addr: impl Into<String>) -> Result<Self, ClientError> {
        Self::connect_with(addr, ConnectOptions::default()).await
    }

    /// Connects with a token and/or TLS.
    pub async fn connect_with(
        addr: impl Into<String>,
        options: ConnectOptions,
    ) -> Result<Self, ClientError> {
        let addr = addr.into();
        let mut endpoint =
            Endpoint::from_shared(addr.clone()).map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let https = addr.starts_with("https://");
        if https {
            let ca = options.ca_pem.as_deref().ok_or_else(|| {
                ClientError::Options(format!(
                    "{addr}: https needs a CA certificate to verify the server"
                ))
            })?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if let Some((cert, key)) = &options.identity_pem {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &options.domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|source| ClientError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
        } else if options.ca_pem.is_some() || options.identity_pem.is_some() {
            return Err(ClientError::Options(format!(
                "{addr}: TLS options need an https:// address"
            )));
        }
        let bearer = match &options.token {
            Some(token) => Some(
                format!("Bearer {}", token.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ClientError::Options("token: must be printable ASCII".into()))?,
            ),
            None => None,
        };
        let channel = endpoint
            .tcp_nodelay(true)
            .max_frame_size(wire::MAX_FRAME_BYTES)
            .initial_stream_window_size(wire::CLIENT_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(wire::CLIENT_CONNECTION_WINDOW_BYTES)
            // Dropping a download part-way (a media repo's user went away) resets its stream,
            // and frames already in flight for it then count as errors; h2's default of 1024 per
            // connection would end a long-lived connection to this trusted server.
            .http2_max_local_error_reset_streams(None)
            .connect()
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        Ok(Self::with_bearer(channel, Bearer(bearer)))
    }

    pub fn from_channel(channel: Channel) -> Self {
        Self::with_bearer(channel, Bearer(None))
    }

    fn with_bearer(channel: Channel, bearer: Bearer) -> Self {
        Self {
            cache: MediaCacheServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            admin: CacheAdminServiceClient::with_interceptor(channel, bearer),
        }
    }

    /// Opens `[offset, offset+limit)` of an object (`limit` 0: to the end). `None` is a miss.
    pub async fn get(
        &mut self,
        key: MediaKey,
        offset: u64,
        limit: u64,
    ) -> Result<Option<Download>, ClientError> {
        let request = GetRequest {
            key: Some(key),
            offset,
            limit,
            ..Default::default()
        };
        Ok(match self.open(request).await? {
            Fetched::Hit(download) => Some(*download),
            Fetched::Miss { .. } => None,
        })
    }

    /// A Get for a media repo about to fetch from the origin on a miss: with `want_lease`, a
    /// miss may carry the fill lease (this caller should fetch and Put with the token); with
    /// `wait_ms`, the server waits that long for another caller's fill before answering.
    pub async fn get_or_lease(
        &mut self,
        key: MediaKey,
        want_lease: bool,
        wait_ms: u32,
    ) -> Result<Fetched, ClientError> {
        self.open(GetRequest {
            key: Some(key),
            want_lease,
            wait_ms,
            ..Default::default()
        })
        .await
    }

    async fn open(&mut self, request: GetRequest) -> Result<Fetched, ClientError> {
        let mut stream = self.cache.get(request).await?.into_inner();
        match stream.message().await?.and_then(|m| m.kind) {
            Some(get_response::Kind::Info(info)) => {
                Ok(Fetched::Hit(Box::new(Download { info, stream })))
            }
            Some(get_response::Kind::Miss(miss)) => {
                // Read the stream's end too, so it closes cleanly instead of being reset.
                while stream.message().await?.is_some() {}
                Ok(Fetched::Miss {
                    lease_token: miss.lease_token,
                })
            }
            _ => Err(ClientError::Protocol("first message must be info or miss")),
        }
    }

    /// A whole object in memory; `None` is a miss.
    pub async fn get_bytes(
        &mut self,
        key: MediaKey,
    ) -> Result<Option<(MediaInfo, Bytes)>, ClientError> {
        let Some(mut download) = self.get(key, 0, 0).await? else {
            return Ok(None);
        };
        let mut body = BytesMut::with_capacity(download.info.size as usize);
        while let Some(chunk) = download.next_chunk().await? {
            body.extend_from_slice(&chunk);
        }
        Ok(Some((download.info, body.freeze())))
    }

    /// Puts a body held in memory; `info.size` is set from it.
    pub async fn put_bytes(
        &mut self,
        key: MediaKey,
        info: MediaInfo,
        body: Bytes,
    ) -> Result<PutResponse, ClientError> {
        self.put_with_lease(key, info, body, "").await
    }

    /// Puts a body held in memory under a fill lease (an empty token is no lease);
    /// `info.size` is set from the body.
    pub async fn put_with_lease(
        &mut self,
        key: MediaKey,
        mut info: MediaInfo,
        body: Bytes,
        lease_token: &str,
    ) -> Result<PutResponse, ClientError> {
        info.size = body.len() as u64;
        let mut header = header_message(key, info);
        if let Some(put_request::Kind::Header(h)) = header.kind.as_mut() {
            h.lease_token = lease_token.to_owned();
        }
        let chunks = (0..body.len())
            .step_by(PUT_CHUNK_BYTES)
            .map(move |s| PutRequest {
                kind: Some(put_request::Kind::Chunk(
                    body.slice(s..(s + PUT_CHUNK_BYTES).min(body.len())),
                )),
            });
        let messages = std::iter::once(header).chain(chunks);
        Ok(self
            .cache
            .put(tokio_stream::iter(messages))
            .await?
            .into_inner())
    }

    /// Gives up a fill lease without storing anything, for a filler whose origin fetch failed:
    /// a caller waiting for the key gets the next lease at once instead of after `lease_ttl`.
    /// A token that is not the key's current lease changes nothing.
    pub async fn release_lease(
        &mut self,
        key: MediaKey,
        lease_token: &str,
    ) -> Result<PutResponse, ClientError> {
        let header = PutRequest {
            kind: Some(put_request::Kind::Header(PutHeader {
                key: Some(key),
                info: None,
                lease_token: lease_token.to_owned(),
                release_lease: true,
            })),
        };
        Ok(self
            .cache
            .put(tokio_stream::iter([header]))
            .await?
            .into_inner())
    }

    /// Streams `info.size` bytes from `reader`. A read error ends the Put (the server then
    /// stores nothing) and is returned.
    pub async fn put_reader<R>(
        &mut self,
        key: MediaKey,
        info: MediaInfo,
        mut reader: R,
    ) -> Result<PutResponse, ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let failure: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
        let seen = failure.clone();
        let header = header_message(key, info);
        let messages = async_stream::stream! {
            yield header;
            loop {
                let mut buf = BytesMut::with_capacity(PUT_CHUNK_BYTES);
                while buf.len() < PUT_CHUNK_BYTES {
                    match reader.read_buf(&mut buf).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            *seen.lock().expect("failure slot") = Some(e);
                            return;
                        }
                    }
                }
                if buf.is_empty() {
                    return;
                }
                yield PutRequest { kind: Some(put_request::Kind::Chunk(buf.freeze())) };
            }
        };
        let answer = self.cache.put(messages).await;
        if let Some(e) = failure.lock().expect("failure slot").take() {
            return Err(e.into());
        }
        Ok(answer?.into_inner())
    }

    pub async fn stat(&mut self, key: MediaKey) -> Result<StatResponse, ClientError> {
        Ok(self
            .cache
            .stat(StatRequest { key: Some(key) })
            .await?
            .into_inner())
    }

    pub async fn purge(
        &mut self,
        key: MediaKey,
        all_variants: bool,
        quarantine: bool,
    ) -> Result<PurgeResponse, ClientError> {
        Ok(self
            .cache
            .purge(PurgeRequest {
                key: Some(key),
                all_variants,
                quarantine,
            })
            .await?
            .into_inner())
    }

    /// Purges every media of an origin; `progress` sees each report as it arrives. Returns the
    /// objects removed.
    pub async fn purge_origin(
        &mut self,
        origin: &str,
        quarantine: bool,
        mut progress: impl FnMut(&PurgeOriginResponse),
    ) -> Result<u64, ClientError> {
        let mut stream = self
            .admin
            .purge_origin(PurgeOriginRequest {
                origin: origin.to_owned(),
                quarantine,
            })
            .await?
            .into_inner();
        while let Some(report) = stream.message().await? {
            progress(&report);
            if report.done {
                return Ok(report.removed);
            }
        }
        Err(ClientError::Protocol("purge ended without a final report"))
    }

    pub async fn stats(&mut self) -> Result<StatsResponse, ClientError> {
        Ok(self.admin.stats(StatsRequest {}).await?.into_inner())
    }

    pub async fn ring_status(&mut self) -> Result<RingStatusResponse, ClientError> {
        Ok(self
            .admin
            .ring_status(RingStatusRequest {})
            .await?
            .into_inner())
    }
}

fn header_message(key: MediaKey, info: MediaInfo) -> PutRequest {
    PutRequest {
        kind: Some(put_request::Kind::Header(PutHeader {
            key: Some(key),
            info: Some(info),
            ..Default::default()
        })),
    }
}
