//! The admin endpoint (`[admin] listen`, loopback only): `/metrics` for
//! Prometheus and `/status` for `meshtun status`. Read-only: nothing here
//! changes the node.
//!
//! HTTP is hyper's, so request parsing is not ours to get wrong. The
//! endpoint is bounded like the data path: a client gets a few seconds to
//! send its request head, and only so many connections are served at once;
//! the rest wait in the kernel's accept queue.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

use crate::accept;
use crate::shared::Shared;

/// Connections served at once. Scrapers and `meshtun status` need one or two.
const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may stay open in all (keep-alive included).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// The OpenMetrics content type, which Prometheus negotiates for.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves until the node closes.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut accepting = accept::Accepting::new("admin endpoint", listener);
    while let Some((permit, tcp, client)) =
        accept::next_bounded(&mut accepting, &permits, &shared.closing).await
    {
        let shared_for_task = shared.clone();
        shared.tasks.spawn(async move {
            let _permit = permit;
            let shared = shared_for_task;
            let service = service_fn(|request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(respond(&shared, &request)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                result = tokio::time::timeout(CONNECTION_TIMEOUT, connection) => match result {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => debug!(%client, %error, "admin connection failed"),
                    Err(_) => debug!(%client, "admin connection open too long; closed"),
                },
                () = shared.closing.cancelled() => {}
            }
        });
    }
}

/// Routes one request.
fn respond(shared: &Shared, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => match shared.metrics_text() {
            Ok(body) => with_type(StatusCode::OK, OPENMETRICS, body),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n"),
        },
        "/status" => match serde_json::to_string_pretty(&shared.status()) {
            Ok(mut body) => {
                body.push('\n');
                with_type(StatusCode::OK, "application/json", body)
            }
            Err(error) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot encode status: {error}\n"),
            ),
        },
        "/" => text(
            StatusCode::OK,
            "meshtun admin endpoint: /metrics (OpenMetrics), /status (JSON)\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics or /status\n",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    with_type(status, "text/plain; charset=utf-8", body.to_owned())
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
