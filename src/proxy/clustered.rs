//! The cluster step, on routes that coalesce when `[cluster]` is set: a write (or an ordered read)
//! whose key another replica owns is sent to that replica, signed, and its answer passed back; a
//! request a peer signed is ordered here and never sent on. See [`crate::cluster`].

use std::time::Instant;

use http::header::HeaderValue;
use http::{Method, Uri};

use super::body::{self, ResponseBody, UpstreamLease};
use super::error::ProxyError;
use super::{classify_send_error, request_key, Exchange, ProxyService};
use crate::cluster::{Cluster, Hop, Owner, HOP_HEADER};
use crate::config::OnPeerDown;
use crate::route::Route;
use crate::upstream::{ms_at, Outcome, SendError};
use crate::wire::{ClientHeaders, OutgoingRequest};

/// Where the cluster step left a request.
pub(super) enum Placed {
    /// The owner answered (or failed after the request reached it).
    Answered(Box<http::Response<ResponseBody>>),
    /// Ordered here: this replica owns the key, a peer sent it (`hop`), the route does not order
    /// it, or its owner is down and `on_peer_down = "local"`.
    Here {
        request: OutgoingRequest,
        hop: Option<Hop>,
    },
}

/// Checks a peer's marker, or sends the request to its key's owner.
pub(super) async fn place<'s>(
    service: &ProxyService,
    cluster: &'s Cluster,
    route: &'s Route,
    mut request: OutgoingRequest,
    exchange: &mut Exchange<'s>,
) -> Result<Placed, ProxyError> {
    let head = &request.head;
    let key = match &route.key {
        Some(rule) => request_key(rule, head)?,
        None => None,
    };
    if let Some(marker) = head.headers.get(HOP_HEADER) {
        let key = key.unwrap_or_default();
        let hop = cluster
            .verify(marker, &head.method, &target(&head.uri), key)
            .inspect_err(|_| cluster.metrics.forged.increment(1))
            .map_err(ProxyError::ForgedHop)?;
        cluster.metrics.received.increment(1);
        remove_marker(&mut request.head.headers);
        return Ok(Placed::Here {
            request,
            hop: Some(hop),
        });
    }
    // Borrowed until the owner is known; copied only for a write that leaves this replica.
    let owner = key
        .filter(|_| ordered(route, &head.method))
        .map(|key| cluster.owner(key));
    let Some(Owner::Peer(index, peer)) = owner else {
        return Ok(Placed::Here { request, hop: None });
    };
    let key = key.unwrap_or_default().to_vec();
    let label = peer.backend.shared_label();
    let now = Instant::now();
    let request = if peer.usable(ms_at(now)) {
        match send(service, cluster, index, route, request, &key, now).await {
            Ok(response) => {
                exchange.backend = Some(label);
                exchange.outcome = Some("forwarded");
                return Ok(Placed::Answered(Box::new(response)));
            }
            Err(Unsent::Failed(error)) => {
                exchange.backend = Some(label);
                return Err(error);
            }
            Err(Unsent::Back(request)) => *request,
        }
    } else {
        request
    };
    match cluster.on_peer_down {
        OnPeerDown::Reject => Err(ProxyError::PeerDown { peer: label }),
        OnPeerDown::Local => {
            cluster.metrics.local_fallbacks.increment(1);
            let mut request = request;
            remove_marker(&mut request.head.headers);
            Ok(Placed::Here { request, hop: None })
        }
    }
}

/// Whether the route orders this method on its key (the requests whose order a cluster keeps).
fn ordered(route: &Route, method: &Method) -> bool {
    route.coalescer.is_some()
        && (route.coalesce.methods.contains(method)
            || (route.coalesce.order_reads && (method == Method::GET || method == Method::HEAD)))
}

/// Why a forward brought no response.
enum Unsent {
    /// Nothing reached the peer: the request is back, to be handled as `on_peer_down` says.
    Back(Box<OutgoingRequest>),
    /// The request (or part of it) reached the peer, which may have applied it.
    Failed(ProxyError),
}

/// Sends `request` to peer `index`, signed, and returns its response.
async fn send(
    service: &ProxyService,
    cluster: &Cluster,
    index: usize,
    route: &Route,
    mut request: OutgoingRequest,
    key: &[u8],
    sent_at: Instant,
) -> Result<http::Response<ResponseBody>, Unsent> {
    let member = &cluster.peers.members[index];
    let peer = member.backend.label();
    let hop = Hop {
        client_ip: service.conn.peer_ip.clone(),
        scheme: service.conn.scheme.clone(),
    };
    let head = &mut request.head;
    let host = head.uri.authority().map(|a| a.as_str().to_string());
    let target = target(&head.uri);
    let marker = cluster
        .sign(&hop, &head.method, &target, key)
        .ok_or(Unsent::Failed(ProxyError::BadRequest(
            "the request cannot be signed for a peer",
        )))?;
    // The owner adds the forwarding headers, for the client the marker names.
    head.forwarding = None;
    let mut headers =
        match std::mem::replace(&mut head.headers, ClientHeaders::Map(Default::default())) {
            ClientHeaders::Lines(lines) => lines.to_map(2),
            ClientHeaders::Map(map) => map,
        };
    if let Some(host) = host {
        // HTTP/2 and absolute-form requests name the host in the URI: the peer reads Host.
        let value = HeaderValue::from_str(&host).map_err(|_| {
            Unsent::Failed(ProxyError::BadRequest(
                "the request authority is not a valid Host",
            ))
        })?;
        headers.insert(http::header::HOST, value);
        head.uri = target
            .parse::<Uri>()
            .map_err(|_| Unsent::Failed(ProxyError::BadRequest("the request has no path")))?;
    }
    headers.insert(HOP_HEADER, marker);
    head.headers = ClientHeaders::Map(headers);
    let inflight = cluster.peers.start_on(index);
    let sent = member
        .backend
        .send(
            request,
            route.connect_timeout,
            route.exchange_timeouts,
            sent_at,
        )
        .await;
    let forwarded =
        metrics::counter!(crate::metrics::CLUSTER_FORWARDED, "peer" => peer.to_string());
    match sent {
        Ok((head, conn)) => {
            let responded = Instant::now();
            forwarded.increment(1);
            member.metrics.responded(head.status, responded - sent_at);
            member.backend.count_exchange(head.status.is_server_error());
            cluster
                .peers
                .record(index, Outcome::Success, ms_at(responded));
            let lease = UpstreamLease {
                conn,
                inflight,
                admission: [None, None],
                responded,
            };
            Ok(body::upstream_response(
                head,
                lease,
                route.exchange_timeouts.idle,
            ))
        }
        Err(failure) => {
            member.metrics.failed();
            member.backend.count_exchange(true);
            cluster
                .peers
                .record(index, Outcome::Failure, ms_at(Instant::now()));
            let reason = if failure.unsent.is_some() {
                "unreachable"
            } else {
                "failed"
            };
            metrics::counter!(crate::metrics::CLUSTER_PEER_ERRORS, "peer" => peer.to_string(), "reason" => reason).increment(1);
            tracing::warn!(peer, error = %failure.error, reason, "forwarding a write to the replica that owns its key failed");
            match failure.unsent {
                Some(request) => Err(Unsent::Back(Box::new(request))),
                None => Err(Unsent::Failed(peer_error(failure.error, route))),
            }
        }
    }
}

fn peer_error(error: SendError, route: &Route) -> ProxyError {
    classify_send_error(error, route.max_body)
}

/// The request target a marker signs: path and query.
fn target(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string())
}

fn remove_marker(headers: &mut ClientHeaders) {
    match headers {
        ClientHeaders::Lines(lines) => lines.remove(HOP_HEADER),
        ClientHeaders::Map(map) => {
            map.remove(HOP_HEADER);
        }
    }
}
