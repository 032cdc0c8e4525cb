//! The HTTP client the fleet's own parts talk to each other with: the edge's shadow filler
//! (through its own listener) and peer-fetch server, the broker's health checker and its
//! calls to the edges' admin APIs.

/// A builder for a client between the fleet's own parts; each caller adds its timeouts.
/// No proxy from the environment: the parts talk directly. Redirects are never followed: a
/// redirect is an answer to relay or to cache, and followed it would carry the fleet's
/// internal headers (the shadow-fill secret, the admin token) to wherever an origin or a
/// misbehaving edge pointed.
///
/// Idle connections are dropped after [`POOL_IDLE`], before the other side's admin listener
/// closes them ([`crate::http_service::HEADER_READ_TIMEOUT`]): a request sent on a
/// connection the server is closing is lost, and a POST is not sent again.
pub fn client() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(POOL_IDLE)
}

/// How long an idle connection between the fleet's parts is kept for reuse.
pub const POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(20);
