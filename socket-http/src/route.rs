//! Routes a daemon's router and its client share, so the two cannot drift: each
//! daemon names its routes once (`routes` in its http module) as typed [`Route`]s
//! (method, path template, request and answer types), registers them with axum
//! ([`Route::on`]) and its client calls them ([`crate::Client::send`]).

use std::marker::PhantomData;

use axum::handler::Handler;
use axum::routing::{MethodFilter, MethodRouter};
use http::Method;

/// One route of a daemon: `Req` is the JSON body it takes (`()`: none), `Resp` the
/// JSON it answers with (`()`: an empty body).
pub struct Route<Req, Resp> {
    pub method: Method,
    /// The path template, `{placeholders}` as axum writes them.
    pub path: &'static str,
    types: PhantomData<fn(&Req) -> Resp>,
}

impl<Req, Resp> Route<Req, Resp> {
    pub const fn new(method: Method, path: &'static str) -> Self {
        Self {
            method,
            path,
            types: PhantomData,
        }
    }

    /// The path with its placeholders filled by `values`, in order (see [`fill`]).
    pub fn at(&self, values: &[&str]) -> String {
        fill(self.path, values)
    }

    /// The route's method served by `handler`, for `Router::route(route.path, …)`.
    pub fn on<H, T, S>(&self, handler: H) -> MethodRouter<S>
    where
        H: Handler<T, S>,
        T: 'static,
        S: Clone + Send + Sync + 'static,
    {
        let filter = MethodFilter::try_from(self.method.clone())
            .unwrap_or_else(|_| panic!("route {} {}: a method axum cannot route", self.method, self.path));
        axum::routing::on(filter, handler)
    }
}

/// A `GET` answering `Resp`.
pub const fn get<Resp>(path: &'static str) -> Route<(), Resp> {
    Route::new(Method::GET, path)
}

/// A `PUT` of `Req` answering `Resp`.
pub const fn put<Req, Resp>(path: &'static str) -> Route<Req, Resp> {
    Route::new(Method::PUT, path)
}

/// A `POST` of `Req` answering `Resp`.
pub const fn post<Req, Resp>(path: &'static str) -> Route<Req, Resp> {
    Route::new(Method::POST, path)
}

/// A `DELETE` answering `Resp` (usually `()`: 204).
pub const fn delete<Resp>(path: &'static str) -> Route<(), Resp> {
    Route::new(Method::DELETE, path)
}

/// `template` with its `{placeholders}` replaced by `values`, in order.
///
/// # Panics
/// When the number of values differs from the number of placeholders: a caller's bug
/// that every test of the route finds.
pub fn fill(template: &str, values: &[&str]) -> String {
    let mut out = String::with_capacity(template.len() + values.iter().map(|v| v.len()).sum::<usize>());
    let mut rest = template;
    let mut values = values.iter();
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').map_or(rest.len(), |c| open + c);
        match values.next() {
            Some(v) => out.push_str(v),
            None => panic!("route {template}: too few values"),
        }
        rest = rest.get(close + 1..).unwrap_or_default();
    }
    out.push_str(rest);
    assert!(values.next().is_none(), "route {template}: too many values");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_in_order() {
        assert_eq!(fill("/vms", &[]), "/vms");
        assert_eq!(fill("/vms/{id}", &["a"]), "/vms/a");
        assert_eq!(
            fill("/vms/{id}/disks/{disk}/resize", &["a", "d1"]),
            "/vms/a/disks/d1/resize"
        );
        assert!(std::panic::catch_unwind(|| fill("/vms/{id}", &[])).is_err());
        assert!(std::panic::catch_unwind(|| fill("/vms", &["x"])).is_err());
    }
}
