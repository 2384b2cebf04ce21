//! The API socket: HTTP/1.1 (hyper) on a unix socket, on one thread. Requests are answered
//! one at a time, as Firecracker's: [`Api::handle`] runs on the server's only thread, so a
//! second request waits for the first; a slow client only holds its own connection.
//!
//! Bodies are read up to [`MAX_PAYLOAD`] bytes (Firecracker's `--http-api-max-payload-size`
//! default); a larger one, by its Content-Length or as it arrives, is refused with 400.

use std::convert::Infallible;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, SERVER};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::api::{Api, Response};

/// Firecracker's default payload limit.
pub const MAX_PAYLOAD: usize = 51_200;
/// How much of a too-large body is read (and dropped) before the refusal.
const DISCARD_MAX: usize = 1 << 20;

/// An error of the HTTP layer: Firecracker's (micro-http's) `{"error": ...}` body.
fn http_error(msg: &str) -> Response {
    Response {
        status: 400,
        body: Some(serde_json::json!({
            "error": format!("{msg}\nAll previous unanswered requests will be dropped.")
        })),
    }
}

fn too_large(size: Option<u64>, limit: usize) -> Response {
    match size {
        Some(n) => http_error(&format!(
            "Request payload with size {n} is larger than the limit of {limit} allowed by server."
        )),
        None => http_error(&format!(
            "Request payload is larger than the limit of {limit} allowed by server."
        )),
    }
}

fn to_http(r: Response) -> hyper::Response<Full<Bytes>> {
    let body = r
        .body
        .map(|b| Bytes::from(b.to_string()))
        .unwrap_or_default();
    let has_body = !body.is_empty();
    let mut resp = hyper::Response::new(Full::new(body));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
    let h = resp.headers_mut();
    h.insert(SERVER, HeaderValue::from_static("Firecracker API"));
    if has_body {
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    resp
}

async fn serve_one(api: Arc<Mutex<Api>>, req: Request<Incoming>, limit: usize) -> Response {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        // Read and drop what is sent (up to a bound), so that the client is not reset while
        // it still writes and does get the answer.
        let mut body = req.into_body();
        let mut dropped = 0usize;
        while dropped <= DISCARD_MAX {
            match body.frame().await {
                Some(Ok(f)) => dropped += f.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
        return too_large(declared, limit);
    }
    let method = req.method().as_str().to_string();
    if !["GET", "PUT", "PATCH", "DELETE"].contains(&method.as_str()) {
        return http_error("Invalid HTTP Method: Unsupported HTTP method.");
    }
    // The path only: a query string is not part of any Firecracker resource.
    let path = req.uri().path().to_string();
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return too_large(None, limit)
        }
        Err(e) => return http_error(&format!("Invalid request body: {e}")),
    };
    let shared = api;
    let mut api = shared.lock().unwrap_or_else(|p| p.into_inner());
    let r = api.handle(&method, &path, &body);
    drop(api);
    enter_sandbox_once_started(&shared);
    log::debug!("api: {method} {path}: {}", r.status);
    r
}

/// Once the VM runs, this thread does no more than serve requests: its seccomp filter goes
/// on (once; the thread's filters stay).
fn enter_sandbox_once_started(api: &Mutex<Api>) {
    static ENTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let started = api.lock().unwrap_or_else(|p| p.into_inner()).started();
    if started && !ENTERED.swap(true, std::sync::atomic::Ordering::AcqRel) {
        if let Err(e) = vmm::sandbox::enter(devices::threads::ThreadKind::Api) {
            log::error!("{e:#}");
        }
    }
}

/// Serves `listener` until the process ends (on the calling thread); bodies up to `limit`.
pub fn run(listener: UnixListener, api: Arc<Mutex<Api>>, limit: usize) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async move {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        // A VM started from --config-file already runs: the runtime is set up, filter now.
        enter_sandbox_once_started(&api);
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("api socket: accept: {e}");
                    continue;
                }
            };
            let api = api.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(to_http(serve_one(api, req, limit).await)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    log::debug!("api socket: connection: {e}");
                }
            });
        }
    })
}
