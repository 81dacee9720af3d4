//! A JSON body extractor whose rejections use the error envelope: malformed JSON is a
//! 400 carrying the parser's message; well-formed JSON of the wrong shape is a 422.

use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use socket_http::ApiError;

/// `Json<T>` with hearth's error envelope.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        parse(&bytes).map(JsonBody)
    }
}

/// `Query<T>` with hearth's error envelope: a query string that does not parse is a 400
/// naming the parameter.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _state: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(q)
            .map(Query)
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
    }
}

/// Parses a request body: syntax errors are 400, shape errors 422.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_request("the request body is empty: send a JSON object"));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => ApiError::bad_request(format!("malformed JSON: {e}")),
            Category::Data => ApiError::unprocessable(format!("invalid request: {e}")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CreateVm;

    #[test]
    fn body_errors_have_honest_statuses_and_the_parsers_message() {
        let cases: &[(&str, u16, &str)] = &[
            ("", 400, "empty"),
            ("{", 400, "EOF"),
            ("{\"image\": tiny}", 400, "malformed JSON: expected ident"),
            ("[1,2]", 422, "invalid type"),
            ("{}", 422, "missing field `image`"),
            ("{\"image\":\"tiny\",\"vcpus\":\"two\"}", 422, "invalid type"),
            ("{\"image\":\"tiny\",\"colour\":1}", 422, "unknown field `colour`"),
            ("{\"image\":\"tiny\",\"vcpus\":-1}", 422, "invalid value"),
        ];
        for (body, status, needle) in cases {
            let err = parse::<CreateVm>(body.as_bytes())
                .err()
                .unwrap_or_else(|| panic!("{body:?} accepted"));
            assert_eq!(err.status.as_u16(), *status, "{body:?}: {}", err.message());
            assert!(err.message().contains(needle), "{body:?}: {}", err.message());
        }
        let ok = parse::<CreateVm>(br#"{"image":"tiny"}"#).expect("minimal body");
        assert_eq!((ok.vcpus, ok.memory_mib, ok.start), (1, 256, true));
    }
}
