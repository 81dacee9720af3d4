//! The web console: the files `web/` builds (`scripts/build-web.sh`: npm packages bundled
//! with esbuild into `web/dist/`), embedded in the binary at compile time, so that an
//! install stays one binary. `GET /` is the app, `GET /assets/{file}` its files; neither
//! needs a key (the app asks for one and sends it with every API call).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;
use socket_http::ApiError;

#[derive(RustEmbed)]
#[folder = "../web/dist/"]
#[allow_missing = true]
struct Assets;

/// The app's page and what it may load: only this server, and WebSockets to it.
const CSP: &str = "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; \
                   connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'";

/// Whether this binary carries the web console.
pub fn built() -> bool {
    Assets::get("index.html").is_some()
}

pub async fn index() -> Response {
    match Assets::get("index.html") {
        Some(file) => {
            let mut response = (
                [
                    (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                file.data.into_owned(),
            )
                .into_response();
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
            headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
            response
        }
        None => ApiError::unavailable(
            "this hearth-api was built without its web console: run scripts/build-web.sh, then build again",
        )
        .into_response(),
    }
}

pub async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    match Assets::get(&file) {
        Some(found) => {
            let mime = found.metadata.mimetype().to_owned();
            (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, mime),
                    (header::CACHE_CONTROL, "no-cache".to_owned()),
                ],
                found.data.into_owned(),
            )
                .into_response()
        }
        None => ApiError::not_found(format!("no web console file {file:?}")).into_response(),
    }
}
