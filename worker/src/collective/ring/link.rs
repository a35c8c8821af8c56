//! The sending side of a ring link: one or more HTTP/2 connections to the right-hand neighbour,
//! all fed from one bounded outbox. Each connection's stream takes the next chunk when HTTP/2 is
//! ready for it, so a slow connection never holds chunks another could send. Several streams
//! matter across nodes, where one HTTP/2 connection caps well below the link.
//!
//! A stream is one `Collective.Link` call made by hand over tonic's channel: each chunk is
//! already framed ([`Framed`]), and its frames go to HTTP/2 as they are, without a codec's copy.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use protocol::auth::AuthChannel;
use protocol::pb;
use tokio::sync::{Mutex, mpsc};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Service;

use super::super::framing::{Framed, LINK_PATH};
use super::super::{CollectiveError, CollectiveHub};
use super::RingOptions;
use crate::stop::StopSignal;

/// The outbox of a link and the signal its streams raise when one of them fails.
pub(crate) struct Outbox {
    pub(crate) chunks: mpsc::Sender<Framed>,
    pub(crate) failed: StopSignal,
}

/// Opens `options.streams` connections to `addr` (rank `right`), retrying each until
/// `options.timeout` since neighbours start at slightly different times, and greets each with
/// `hello`.
pub(crate) async fn open(
    hub: &CollectiveHub,
    addr: &str,
    right: u32,
    options: &RingOptions,
    hello: pb::CollectiveChunk,
) -> Result<Outbox, CollectiveError> {
    let (streams, timeout, send_buffer) = (options.streams, options.timeout, options.send_buffer_bytes);
    let endpoint = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let connect_err = |message: String| CollectiveError::Connect {
        rank: right,
        addr: addr.to_string(),
        message,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut channels = vec![];
    for _ in 0..streams.max(1) {
        // Each `connect` is its own TCP connection, so the streams do not share one HTTP/2
        // connection's flow control.
        let channel = loop {
            let attempt = async {
                let endpoint = tonic::transport::Endpoint::from_shared(endpoint.clone())?
                    .initial_stream_window_size(super::super::STREAM_WINDOW_BYTES)
                    .initial_connection_window_size(super::super::STREAM_WINDOW_BYTES)
                    .tcp_nodelay(true);
                match send_buffer {
                    Some(bytes) => endpoint.connect_with_connector(sized_connector(bytes)).await,
                    None => endpoint.connect().await,
                }
            };
            match attempt.await {
                Ok(channel) => break hub.token.channel(channel),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(connect_err(e.to_string())),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        channels.push(channel);
    }
    // Bounded like the pieces a rank keeps in flight.
    let (tx, rx) = mpsc::channel(options.chunks_in_flight.max(2));
    let shared = Arc::new(Mutex::new(rx));
    let failed = StopSignal::default();
    for channel in channels {
        let (shared, failed) = (shared.clone(), failed.clone());
        let chunks = futures::stream::unfold(shared, |rx| async move {
            let chunk = rx.lock().await.recv().await?;
            Some((chunk, rx))
        });
        let greeting = Framed::new(&hello, bytes::Bytes::new());
        let frames = futures::stream::iter([greeting])
            .chain(chunks)
            .flat_map(|framed| futures::stream::iter(framed.frames()));
        let run = hello.run_id.clone();
        // Detached: it ends by itself when the outbox is dropped and its queue has drained.
        tokio::spawn(async move {
            if let Err(status) = call_link(channel, frames).await {
                tracing::warn!(%run, to_rank = right, "collective link ended: {status}");
                failed.raise(&format!("{}: {}", status.code(), status.message()));
            }
        });
    }
    Ok(Outbox { chunks: tx, failed })
}

/// Connects like tonic's own connector (no delay on small writes), with `SO_SNDBUF` set to
/// `bytes` before the connection is made.
fn sized_connector(
    bytes: u32,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Send
+ 'static {
    tower::service_fn(move |uri: http::Uri| async move {
        let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what} in {uri}"));
        let host = uri.host().ok_or_else(|| invalid("no host"))?;
        let port = uri.port_u16().ok_or_else(|| invalid("no port"))?;
        let mut last = invalid("no address");
        for addr in tokio::net::lookup_host((host.trim_matches(['[', ']']), port)).await? {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_send_buffer_size(bytes)?;
            match socket.connect(addr).await {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(hyper_util::rt::TokioIo::new(stream));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    })
}

/// One `Collective.Link` call whose request body is `frames`; returns the call's status.
async fn call_link<S>(mut channel: AuthChannel, frames: S) -> Result<(), Status>
where
    S: futures::Stream<Item = bytes::Bytes> + Send + 'static,
{
    let body = StreamBody::new(frames.map(|b| Ok::<_, Infallible>(http_body::Frame::data(b))));
    let request = http::Request::builder()
        .method(http::Method::POST)
        .version(http::Version::HTTP_2)
        .uri(LINK_PATH)
        .header(http::header::TE, "trailers")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(Body::new(body))
        .expect("static request parts are valid");
    let unavailable = |e: tonic::transport::Error| Status::unavailable(e.to_string());
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(unavailable)?;
    let response = channel.call(request).await.map_err(unavailable)?;
    // A refusal comes as a trailers-only response: the status is in the headers.
    if let Some(status) = Status::from_header_map(response.headers()) {
        return into_result(status);
    }
    if response.status() != http::StatusCode::OK {
        return Err(Status::unknown(format!(
            "collective link got HTTP {}",
            response.status()
        )));
    }
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(status) = frame.trailers_ref().and_then(Status::from_header_map) {
            return into_result(status);
        }
    }
    Err(Status::unknown("collective link ended without a gRPC status"))
}

fn into_result(status: Status) -> Result<(), Status> {
    match status.code() {
        tonic::Code::Ok => Ok(()),
        _ => Err(status),
    }
}
