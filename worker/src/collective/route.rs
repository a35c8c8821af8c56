//! The `Collective` service as a worker serves it: `Link`, the ring's hot path, read straight
//! off the HTTP/2 frames with [`super::framing`]; every other method (`FetchState`) through the
//! generated server. Both sit behind the same token check, and generated `Link` clients work
//! against either.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use protocol::pb;
use protocol::pb::collective_server::CollectiveServer;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use super::CollectiveHub;
use super::framing::{LINK_PATH, MessageReader, put_prefix};

#[derive(Clone)]
pub(super) struct LinkRoute {
    pub(super) hub: CollectiveHub,
    pub(super) generated: CollectiveServer<CollectiveHub>,
}

impl NamedService for LinkRoute {
    const NAME: &'static str = <CollectiveServer<CollectiveHub> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for LinkRoute {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<http::Request<Body>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != LINK_PATH {
            return self.generated.call(req);
        }
        let hub = self.hub.clone();
        Box::pin(async move {
            let compressed = req
                .headers()
                .get("grpc-encoding")
                .is_some_and(|e| e.as_bytes() != b"identity");
            if compressed {
                return Ok(Status::unimplemented("collective links are not compressed").into_http());
            }
            let chunks = Box::pin(chunks(req.into_body()));
            Ok(match hub.receive_link(chunks).await {
                Ok(closed) => reply(&closed),
                Err(status) => status.into_http(),
            })
        })
    }
}

/// The chunks of a link's request body, as whole messages arrive.
fn chunks(body: Body) -> impl futures::Stream<Item = Result<pb::CollectiveChunk, Status>> + Send {
    futures::stream::try_unfold(
        (body, MessageReader::default(), false),
        |(mut body, mut reader, mut ended)| async move {
            loop {
                let invalid = |e: super::framing::FramingError| Status::invalid_argument(e.to_string());
                if let Some(chunk) = reader.next_chunk().map_err(invalid)? {
                    return Ok(Some((chunk, (body, reader, ended))));
                }
                if ended {
                    reader.finish().map_err(invalid)?;
                    return Ok(None);
                }
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            reader.push(data);
                        }
                    }
                    Some(Err(status)) => return Err(status),
                    None => ended = true,
                }
            }
        },
    )
}

/// A successful unary reply: one message, then the OK status in the trailers.
fn reply(message: &impl prost::Message) -> http::Response<Body> {
    let mut framed = Vec::new();
    put_prefix(&mut framed, message.encoded_len());
    message.encode(&mut framed).expect("a Vec grows");
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = [
        http_body::Frame::data(Bytes::from(framed)),
        http_body::Frame::trailers(trailers),
    ];
    let body = StreamBody::new(futures::stream::iter(frames.map(Ok::<_, Infallible>)));
    http::Response::builder()
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(Body::new(body))
        .expect("static headers are valid")
}
