//! HTTP client for the REST API.

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Talks to hearth-api with an API key.
pub struct ApiClient {
    base: String,
    key: String,
    /// Sent as `?project=` with every request.
    project: Option<String>,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl ApiClient {
    pub fn new(base: &str, key: &str) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(anyhow!("unsupported API URL {base:?}: use http://host:port"));
        }
        Ok(Self {
            base,
            key: key.to_string(),
            project: None,
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Works in `project` instead of `default`.
    pub fn with_project(mut self, project: Option<String>) -> Self {
        self.project = project;
        self
    }

    /// `path` with the project added to its query.
    pub fn path(&self, path: &str) -> String {
        match &self.project {
            None => path.to_string(),
            Some(p) => {
                let sep = if path.contains('?') { '&' } else { '?' };
                format!("{path}{sep}project={p}")
            }
        }
    }

    async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(http::StatusCode, Bytes)> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, self.path(path)))
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.key));
        let payload = match body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(&b)?)
            }
            None => Bytes::new(),
        };
        let resp = self
            .http
            .request(req.body(Full::new(payload))?)
            .await
            .with_context(|| format!("cannot reach the hearth API at {}", self.base))?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    async fn json(&self, method: http::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let (status, bytes) = self.send(method, path, body).await?;
        if !status.is_success() {
            return Err(error_from(status, &bytes));
        }
        serde_json::from_slice(&bytes).context("the API answered something that is not JSON")
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.json(http::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.json(http::Method::POST, path, body).await
    }

    pub async fn put(&self, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.json(http::Method::PUT, path, body).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.json(http::Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.json(http::Method::DELETE, path, None).await
    }

    /// DELETE answering 204 No Content.
    pub async fn delete_empty(&self, path: &str) -> anyhow::Result<()> {
        let (status, bytes) = self.send(http::Method::DELETE, path, None).await?;
        if !status.is_success() {
            return Err(error_from(status, &bytes));
        }
        Ok(())
    }

    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Bytes> {
        let (status, bytes) = self.send(http::Method::GET, path, None).await?;
        if !status.is_success() {
            return Err(error_from(status, &bytes));
        }
        Ok(bytes)
    }
}

/// Turns the error envelope into a readable message.
pub fn error_from(status: http::StatusCode, body: &[u8]) -> anyhow::Error {
    match serde_json::from_slice::<socket_http::ErrorEnvelope>(body) {
        Ok(env) => anyhow!("{} ({})", env.error.message, status),
        Err(_) => anyhow!("the API answered {status}: {}", String::from_utf8_lossy(body).trim()),
    }
}
