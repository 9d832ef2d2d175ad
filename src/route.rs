//! Routing: which route a request belongs to.
//!
//! Routes are sorted once per snapshot so that matching is a scan that stops at the first hit: routes
//! with a host before host-less ones, then longer `path_prefix` first. A request whose path matches a
//! route but whose method none of the matching routes accepts gets 405 rather than 404.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use crate::admission::Limiter;
use crate::buffer::{Buffer, BufferPolicy};
use crate::coalesce::Coalescer;
use crate::config::{CoalesceConfig, RouteConfig};
use crate::http1::ExchangeTimeouts;
use crate::idempotency::{Policy, Store};
use crate::key::KeyRule;
use crate::metrics::RouteMetrics;

/// One route as the request path uses it.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    path_prefix: Box<str>,
    host: Option<Box<str>>,
    methods: Option<Box<[Method]>>,
    /// Index into the snapshot's upstreams.
    pub upstream: usize,
    pub connect_timeout: Duration,
    /// The response timeout, and the longest a backend may stall mid-body.
    pub exchange_timeouts: ExchangeTimeouts,
    pub client_body_timeout: Duration,
    pub max_body: u64,
    pub key: Option<KeyRule>,
    pub coalesce: CoalesceConfig,
    /// The route's key queues, when it coalesces.
    pub coalescer: Option<Arc<Coalescer>>,
    /// Idempotency keys, when the route honours them.
    pub idempotency: Option<Box<Policy>>,
    /// Durable write buffering, when the route buffers.
    pub buffer: Option<Box<BufferPolicy>>,
    /// Position in the router's match order (set by [`Router::new`]).
    pub index: usize,
    pub admission: Option<Arc<Limiter>>,
    pub retries: u32,
    pub retry_idempotent: bool,
    pub retry_budget: RetryBudget,
    pub metrics: RouteMetrics,
}

/// Keeps retries under a fraction of requests: each request deposits `ratio` of a retry, each
/// retry withdraws one. A reserve of a few retries lets a quiet route retry at all.
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a retry deposited per request.
    per_request: u64,
    /// Thousandths of a retry available.
    balance: AtomicU64,
}

/// Retries a route may bank (in thousandths): enough for a burst, not for an outage.
const RETRY_RESERVE: u64 = 10_000;

impl RetryBudget {
    pub fn new(ratio: f64) -> RetryBudget {
        RetryBudget {
            per_request: (ratio * 1000.0) as u64,
            balance: AtomicU64::new(RETRY_RESERVE),
        }
    }

    pub fn deposit(&self) {
        if self.balance.load(Ordering::Relaxed) < RETRY_RESERVE {
            let _ = self
                .balance
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    Some((b + self.per_request).min(RETRY_RESERVE))
                });
        }
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_sub(1000)
            })
            .is_ok()
    }
}

impl Route {
    /// `coalescer`, `admission` and the idempotency store are kept from the previous snapshot
    /// when it had them.
    pub fn new(
        config: &RouteConfig,
        coalescer: Option<Arc<Coalescer>>,
        admission: Option<Arc<Limiter>>,
        idempotency_store: Option<Arc<dyn Store>>,
        buffer: Option<Result<Arc<Buffer>, String>>,
    ) -> Route {
        let buffer = config
            .buffer
            .clone()
            .zip(buffer)
            .map(|(config, buffer)| Box::new(BufferPolicy { config, buffer }));
        let idempotency = config
            .idempotency
            .clone()
            .zip(idempotency_store)
            .map(|(settings, store)| Box::new(Policy::new(settings, store, &config.name)));
        Route {
            idempotency,
            buffer,
            metrics: RouteMetrics::new(&config.name),
            admission,
            retries: config.retries,
            retry_idempotent: config.retry_idempotent,
            retry_budget: RetryBudget::new(config.retry_budget),
            coalesce: config.coalesce.clone(),
            coalescer,
            index: 0,
            name: config.name.as_str().into(),
            path_prefix: config.path_prefix.as_str().into(),
            host: config.host.as_deref().map(Into::into),
            methods: config.methods.clone().map(Into::into),
            upstream: config.upstream,
            connect_timeout: config.connect_timeout,
            exchange_timeouts: ExchangeTimeouts {
                response: config.response_timeout,
                idle: config.backend_idle_timeout,
            },
            client_body_timeout: config.client_body_timeout,
            max_body: config.max_body,
            key: config.key.clone(),
        }
    }

    /// Without a `methods` list a route takes every method but CONNECT and TRACE: the proxy
    /// tunnels nothing, and TRACE would echo the client's credentials to whoever asked; a route
    /// that lists them takes them.
    fn accepts(&self, method: &Method) -> bool {
        match &self.methods {
            Some(methods) => methods.contains(method),
            None => *method != Method::CONNECT && *method != Method::TRACE,
        }
    }
}

/// The outcome of matching one request.
#[derive(Debug)]
pub enum RouteMatch<'a> {
    Found(&'a Route),
    MethodNotAllowed,
    NotFound,
}

/// All routes of a snapshot, in match order.
#[derive(Debug)]
pub struct Router {
    routes: Box<[Route]>,
}

impl Router {
    pub fn new(mut routes: Vec<Route>) -> Router {
        routes.sort_by(|a, b| {
            b.host
                .is_some()
                .cmp(&a.host.is_some())
                .then(b.path_prefix.len().cmp(&a.path_prefix.len()))
        });
        for (index, route) in routes.iter_mut().enumerate() {
            route.index = index;
        }
        Router {
            routes: routes.into(),
        }
    }

    /// `host` is the request's host without port, in any case; `None` when the request had none.
    pub fn find(&self, host: Option<&str>, path: &str, method: &Method) -> RouteMatch<'_> {
        // An authority-form target (CONNECT) has no path: it is matched as "/".
        let path = if path.is_empty() { "/" } else { path };
        let mut path_matched = false;
        for route in self.routes.iter() {
            let host_ok = match (&route.host, host) {
                (None, _) => true,
                (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                (Some(_), None) => false,
            };
            if !host_ok || !path.starts_with(&*route.path_prefix) {
                continue;
            }
            if route.accepts(method) {
                return RouteMatch::Found(route);
            }
            path_matched = true;
        }
        if path_matched {
            RouteMatch::MethodNotAllowed
        } else {
            RouteMatch::NotFound
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, prefix: &str, host: Option<&str>, methods: Option<&[Method]>) -> Route {
        Route {
            name: name.into(),
            path_prefix: prefix.into(),
            host: host.map(Into::into),
            methods: methods.map(|m| m.to_vec().into()),
            upstream: 0,
            connect_timeout: Duration::from_secs(1),
            exchange_timeouts: ExchangeTimeouts {
                response: Duration::from_secs(1),
                idle: Duration::from_secs(1),
            },
            client_body_timeout: Duration::from_secs(1),
            max_body: 1,
            key: None,
            coalesce: CoalesceConfig::default(),
            coalescer: None,
            idempotency: None,
            buffer: None,
            index: 0,
            admission: None,
            retries: 0,
            retry_idempotent: false,
            retry_budget: RetryBudget::new(0.0),
            metrics: RouteMetrics::new(name),
        }
    }

    fn name(m: RouteMatch<'_>) -> &str {
        match m {
            RouteMatch::Found(r) => &r.name,
            RouteMatch::MethodNotAllowed => "405",
            RouteMatch::NotFound => "404",
        }
    }

    #[test]
    fn longest_prefix_and_host_win() {
        let router = Router::new(vec![
            route("root", "/", None, None),
            route("kv", "/kv/", None, None),
            route("api-host", "/", Some("api.example.com"), None),
        ]);
        assert_eq!(name(router.find(None, "/kv/a", &Method::GET)), "kv");
        assert_eq!(name(router.find(None, "/other", &Method::GET)), "root");
        assert_eq!(
            name(router.find(Some("API.example.com"), "/kv/a", &Method::GET)),
            "api-host"
        );
        assert_eq!(
            name(router.find(Some("other.example.com"), "/kv/a", &Method::GET)),
            "kv"
        );
    }

    #[test]
    fn methods_and_misses() {
        let router = Router::new(vec![route("writes", "/w/", None, Some(&[Method::PUT]))]);
        assert_eq!(name(router.find(None, "/w/x", &Method::PUT)), "writes");
        assert_eq!(name(router.find(None, "/w/x", &Method::GET)), "405");
        assert_eq!(name(router.find(None, "/r/x", &Method::GET)), "404");
    }
}

#[cfg(test)]
mod budget_tests {
    use super::RetryBudget;

    #[test]
    fn retries_stay_under_the_ratio_once_the_reserve_is_spent() {
        let budget = RetryBudget::new(0.2);
        // A quiet route can retry a few times at once...
        let reserve = (0..100).take_while(|_| budget.withdraw()).count();
        assert_eq!(reserve, 10);
        // ...and then one retry per five requests: an outage is not multiplied.
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.withdraw() {
                retries += 1;
            }
        }
        assert_eq!(retries, 200);
    }

    #[test]
    fn a_zero_budget_allows_only_the_reserve() {
        let budget = RetryBudget::new(0.0);
        for _ in 0..10 {
            assert!(budget.withdraw());
        }
        budget.deposit();
        assert!(!budget.withdraw());
    }
}
