//! The HTTP/1 server alone, without the proxy: scripted bytes in over an in-memory pipe, a fake
//! handler behind the `Handler` trait the server defines (as Pingora tests its protocol crates).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use writegate::http1::server::{serve, ClientIo, Handler, ResponseSource, StopSignal, Timeouts};
use writegate::http1::Http1Error;
use writegate::wire::{OutgoingRequest, PendingHeaders};

/// One end of an in-memory pipe as a client transport.
struct Pipe(DuplexStream);

impl AsyncRead for Pipe {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl ClientIo for Pipe {}

/// Answers `METHOD PATH BODY-LENGTH` for every request, after reading its body.
#[derive(Clone)]
struct Echo;

/// A body of known bytes, sent in one piece.
struct Text(Option<Bytes>);

impl Body for Text {
    type Data = Bytes;
    type Error = Http1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Http1Error>>> {
        Poll::Ready(self.get_mut().0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}

impl ResponseSource for Text {
    fn take_pending_headers(&mut self) -> Option<PendingHeaders> {
        None
    }

    fn failure_message(&self, error: &Http1Error) -> String {
        format!("502 Bad Gateway: {error}\n")
    }
}

impl Handler for Echo {
    type Body = Text;

    async fn handle(self, request: OutgoingRequest) -> Response<Text> {
        let head = format!("{} {}", request.head.method, request.head.uri);
        let body = request.body.collect().await.map(|b| b.to_bytes());
        let text = match body {
            Ok(body) => format!("{head} {}", body.len()),
            Err(e) => format!("{head} body error: {e}"),
        };
        Response::new(Text(Some(Bytes::from(text))))
    }
}

async fn exchange(input: &[u8]) -> String {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let timeouts = Timeouts {
        header_read: Duration::from_secs(5),
        idle: Duration::from_secs(5),
        park_after: None,
    };
    let serving = tokio::spawn(serve(
        Pipe(server),
        Echo,
        timeouts,
        Arc::new(StopSignal::default()),
        true,
    ));
    let (mut reader, mut writer) = tokio::io::split(client);
    writer.write_all(input).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut out))
        .await
        .expect("the server to answer and close within 10 s")
        .unwrap();
    drop(writer);
    let _ = serving.await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn pipelined_requests_reach_the_handler_in_order_with_their_bodies() {
    let out = exchange(
        b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
          POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n\
          GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let bodies: Vec<&str> = out
        .split("HTTP/1.1 200 OK\r\n")
        .skip(1)
        .map(|r| r.split("\r\n\r\n").nth(1).unwrap_or_default())
        .collect();
    assert_eq!(bodies, ["PUT /a 3", "POST /b 2", "GET /c 0"], "{out}");
    assert!(out.contains("connection: close"), "{out}");
}

#[tokio::test]
async fn malformed_requests_never_reach_the_handler() {
    let out = exchange(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "the head is valid: {out}");
    assert!(
        out.contains("body error: reading the request body failed: malformed chunked body"),
        "{out}"
    );
    let out = exchange(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(!out.contains("GET /"), "the handler saw it: {out}");
}
