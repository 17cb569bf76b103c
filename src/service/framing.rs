//! `MediaCacheService.Get` answered with gRPC frames made by hand, so a body chunk goes to the
//! transport as the very `Bytes` the store produced (a slice of a Redis reply or of a memory
//! tier entry). tonic's generated encoder copies every message into its own buffer first: on the
//! Get path that copy, and the page faults of the fresh buffer it lands in, took about a quarter
//! of the service's CPU (see BENCHMARKS.md, "Profile"). Every other method is the generated one.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use http_body_util::BodyExt;
use prost::Message;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::{Code, Status};

use super::media::MediaHandlers;
use super::stream::{GetItem, GetStream};
use crate::proto::media_cache_service_server::MediaCacheServiceServer;
use crate::proto::{GetRequest, GetResponse};

/// gRPC's message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;
/// A `GetRequest` is a key and a few numbers; a bigger request is refused before it is buffered.
const MAX_GET_REQUEST_BYTES: usize = 64 * 1024;
/// Field number of `GetResponse.chunk`.
const CHUNK_FIELD: u32 = 2;

/// The `MediaCacheService` service: Get framed here, the rest by the generated server.
#[derive(Clone)]
pub struct MediaCacheRoutes {
    service: Arc<MediaHandlers>,
    generated: MediaCacheServiceServer<MediaHandlers>,
}

impl MediaCacheRoutes {
    /// `max_decoding_message_size` bounds the messages of the generated methods (Put's chunks).
    pub fn new(service: MediaHandlers, max_decoding_message_size: usize) -> Self {
        let service = Arc::new(service);
        Self {
            generated: MediaCacheServiceServer::from_arc(service.clone())
                .max_decoding_message_size(max_decoding_message_size),
            service,
        }
    }
}

impl NamedService for MediaCacheRoutes {
    const NAME: &'static str = <MediaCacheServiceServer<MediaHandlers> as NamedService>::NAME;
}

impl tower_service::Service<http::Request<Body>> for MediaCacheRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != crate::wire::GET_PATH {
            return self.generated.call(request);
        }
        let service = self.service.clone();
        async move { Ok(get(&service, request).await) }.boxed()
    }
}

async fn get(service: &MediaHandlers, request: http::Request<Body>) -> http::Response<Body> {
    // The request's place among the streams in flight is taken before its body is read, and
    // the body must arrive within the idle timeout: a client that opens Gets and never sends
    // them holds neither memory nor a place for long.
    let active = match service.enter() {
        Ok(active) => active,
        Err(status) => return status.into_http(),
    };
    let (parts, body) = request.into_parts();
    let idle = service.limits().idle_timeout;
    let message = match tokio::time::timeout(idle, read_request(body)).await {
        Ok(Ok(message)) => message,
        Ok(Err(status)) => return status.into_http(),
        Err(_) => {
            return Status::deadline_exceeded(format!(
                "limits.idle_timeout: the GetRequest did not arrive within {idle:?}"
            ))
            .into_http()
        }
    };
    let request = tonic::Request::from_http(http::Request::from_parts(parts, message));
    match service.get_entered(request, active).await {
        Err(status) => status.into_http(),
        Ok(stream) => {
            let mut http = http::Response::new(Body::new(GetBody {
                stream,
                chunk: None,
                done: false,
            }));
            http.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            http
        }
    }
}

/// The one length-prefixed `GetRequest` of a request body.
async fn read_request(body: Body) -> Result<GetRequest, Status> {
    let bytes = http_body_util::Limited::new(body, PREFIX + MAX_GET_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Status::resource_exhausted(format!(
                    "request: a GetRequest is at most {MAX_GET_REQUEST_BYTES} bytes"
                ))
            } else {
                Status::cancelled(format!("request: the body ended early: {e}"))
            }
        })?
        .to_bytes();
    let Some((prefix, message)) = bytes.split_first_chunk::<PREFIX>() else {
        return Err(Status::invalid_argument(
            "request: expected one GetRequest message, got none",
        ));
    };
    if prefix[0] != 0 {
        return Err(Status::unimplemented(
            "grpc-encoding: compressed requests are not supported",
        ));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len != message.len() {
        return Err(Status::invalid_argument(format!(
            "request: expected one GetRequest message of {len} bytes, got {} bytes",
            message.len()
        )));
    }
    GetRequest::decode(message)
        .map_err(|e| Status::invalid_argument(format!("request: not a GetRequest: {e}")))
}

/// The response body: each message length-prefixed; a chunk as its prefix and field header,
/// then its bytes untouched; then the status as trailers.
struct GetBody {
    stream: GetStream,
    /// The body of the chunk whose header was just sent.
    chunk: Option<Bytes>,
    done: bool,
}

impl http_body::Body for GetBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(chunk) = this.chunk.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        let frame = match ready!(this.stream.as_mut().poll_next(cx)) {
            Some(Ok(GetItem::Chunk(chunk))) => {
                let header = chunk_header(chunk.len());
                this.chunk = (!chunk.is_empty()).then_some(chunk);
                http_body::Frame::data(header)
            }
            Some(Ok(message)) => http_body::Frame::data(encode(&GetResponse::from(message))),
            Some(Err(status)) => {
                this.done = true;
                http_body::Frame::trailers(trailers(&status))
            }
            None => {
                this.done = true;
                http_body::Frame::trailers(trailers(&Status::new(Code::Ok, "")))
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.chunk.is_none()
    }
}

/// What precedes a chunk's bytes: the message prefix, then the field's key and length.
fn chunk_header(len: usize) -> Bytes {
    let key = u64::from(CHUNK_FIELD << 3 | prost::encoding::WireType::LengthDelimited as u32);
    let fields =
        prost::encoding::encoded_len_varint(key) + prost::encoding::encoded_len_varint(len as u64);
    let mut header = prefixed(fields + len, fields);
    prost::encoding::encode_varint(key, &mut header);
    prost::encoding::encode_varint(len as u64, &mut header);
    header.freeze()
}

/// A buffer holding the prefix of an uncompressed message of `len` bytes, with room for `more`.
fn prefixed(len: usize, more: usize) -> BytesMut {
    let mut out = BytesMut::with_capacity(PREFIX + more);
    out.put_u8(0);
    out.put_u32(len as u32);
    out
}

fn encode(message: &GetResponse) -> Bytes {
    let len = message.encoded_len();
    let mut out = prefixed(len, len);
    message
        .encode(&mut out)
        .expect("the buffer was sized for the message");
    out.freeze()
}

fn trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Only a message that cannot be a header value gets here.
        map.insert("grpc-status", http::HeaderValue::from(status.code() as i32));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::MediaInfo;
    use futures_util::StreamExt;

    /// The body as the generated encoder would have framed the same messages.
    fn framed(messages: &[GetResponse]) -> Vec<u8> {
        messages.iter().flat_map(|m| encode(m).to_vec()).collect()
    }

    async fn drain(messages: Vec<Result<GetItem, Status>>) -> (Vec<u8>, http::HeaderMap) {
        let mut body = GetBody {
            stream: futures_util::stream::iter(messages).boxed(),
            chunk: None,
            done: false,
        };
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            assert!(trailers.is_none(), "a frame after the trailers");
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = Some(frame.into_trailers().unwrap()),
            }
        }
        assert!(http_body::Body::is_end_stream(&body));
        (data, trailers.expect("trailers"))
    }

    #[tokio::test]
    async fn chunks_are_framed_as_prost_frames_them() {
        let info = MediaInfo {
            content_type: "image/png".into(),
            size: 300_000,
            ..Default::default()
        };
        // Lengths whose varints take 1, 2 and 3 bytes, and an empty chunk.
        let chunks: Vec<Bytes> = [0usize, 5, 127, 128, 16_383, 16_384, 283_488]
            .iter()
            .map(|&n| Bytes::from(vec![n as u8; n]))
            .collect();
        let items = || {
            std::iter::once(GetItem::Info(info.clone()))
                .chain(chunks.iter().cloned().map(GetItem::Chunk))
        };
        let (data, trailers) = drain(items().map(Ok).collect()).await;
        let expected: Vec<GetResponse> = items().map(GetResponse::from).collect();
        assert_eq!(data, framed(&expected));
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    }

    #[tokio::test]
    async fn an_error_ends_the_body_with_its_status() {
        let miss = || GetItem::Miss(String::new());
        let (data, trailers) = drain(vec![
            Ok(miss()),
            Err(Status::unavailable("shard-0 went down")),
            Ok(miss()),
        ])
        .await;
        assert_eq!(data, framed(&[miss().into()]));
        let status = Status::from_header_map(&trailers).expect("a status");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "shard-0 went down");
    }

    async fn request_of(bytes: Vec<u8>) -> Result<GetRequest, Status> {
        read_request(Body::new(http_body_util::Full::new(Bytes::from(bytes)))).await
    }

    /// The message of the status `bytes` are refused with, which must have `code`.
    async fn refused(bytes: Vec<u8>, code: Code) -> String {
        let status = request_of(bytes).await.unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
        status.message().to_owned()
    }

    #[tokio::test]
    async fn bad_request_bodies_are_refused_by_name() {
        let message = GetRequest {
            offset: 7,
            ..Default::default()
        }
        .encode_to_vec();
        let mut good = vec![0];
        good.extend((message.len() as u32).to_be_bytes());
        good.extend(&message);
        assert_eq!(request_of(good.clone()).await.unwrap().offset, 7);

        let empty = refused(Vec::new(), Code::InvalidArgument).await;
        assert!(empty.contains("got none"), "{empty}");

        let mut compressed = good.clone();
        compressed[0] = 1;
        refused(compressed, Code::Unimplemented).await;

        let short = refused(good[..good.len() - 1].to_vec(), Code::InvalidArgument).await;
        assert!(short.starts_with("request:"), "{short}");

        let garbage = refused(vec![0, 0, 0, 0, 2, 0xff, 0xff], Code::InvalidArgument).await;
        assert!(garbage.contains("not a GetRequest"), "{garbage}");

        refused(
            vec![0; PREFIX + MAX_GET_REQUEST_BYTES + 1],
            Code::ResourceExhausted,
        )
        .await;
    }
}
